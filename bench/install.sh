#!/usr/bin/env bash
# Install what the benchmark suite (bench/run.py) needs, idempotently:
#   .venv/           ckpt and the test servers (tests/install.sh, run if .venv has no ckpt)
#                    plus matplotlib for the chart
#   bench/.awscli/   the AWS CLI v1 (pip awscli) in a venv of its own: its botocore
#                    pins clash with s3fs's, so it cannot share .venv
#   rsync, rclone    Debian packages (only as root; otherwise it says what to install)
#   s3rver           case 5's second S3 server: tests/install.sh's npm install
#   py-spy           the sampling profiler of bench/results/findings.md (pip, into the venv)
# cp, tar and gzip come with every Debian. Nothing is written outside the
# repository except the apt packages. Set CKPT_BENCH_VENV to use another venv
# that has ckpt instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "bench/install.sh: $*" >&2; }

venv=${CKPT_BENCH_VENV:-.venv}

# -- ckpt and the servers (s3rver for case 5 comes with tests/install.sh's npm install)
if [ ! -x "$venv/bin/ckpt" ] || [ ! -e tests/servers/node_modules/s3rver/bin/s3rver.js ]; then
    bash tests/install.sh
fi

# -- the baselines from apt
missing=()
for tool in rsync rclone tar gzip; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q && apt-get install -y -q "${missing[@]}"
        ) </dev/null >/dev/null
    else
        say "missing ${missing[*]}: install them (sudo apt-get install ${missing[*]}); the cases that need them fail"
    fi
fi

# -- the AWS CLI v1, in its own venv
if ! bench/.awscli/bin/aws --version >/dev/null 2>&1; then
    rm -rf bench/.awscli
    python3 -m venv bench/.awscli
    bench/.awscli/bin/pip install -q -U pip
    bench/.awscli/bin/pip install -q awscli
fi

# -- py-spy, the profiler findings.md's profiles were taken with (not needed by the cases)
if [ ! -x "$venv/bin/py-spy" ]; then
    "$venv/bin/pip" install -q py-spy || say "py-spy could not be installed: profiling as in findings.md needs it"
fi

# -- matplotlib for the chart (the `bench` dependency group when pyproject.toml has one)
if ! "$venv/bin/python" -c "import matplotlib" >/dev/null 2>&1; then
    if grep -q '^bench = \[' pyproject.toml; then
        "$venv/bin/pip" install -q --group bench
    else
        "$venv/bin/pip" install -q matplotlib
    fi
fi
