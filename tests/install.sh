#!/usr/bin/env bash
# Install everything the test-suite needs into this checkout, idempotently:
#   .venv/                    ckpt with every storage extra, and the test group
#                             (pytest, moto, gcp-storage-emulator, ...)
#   .venv/wheelhouse          wheels of ckpt-run[s3]'s dependencies (offline installs in tests/packaging)
#   tests/servers/node_modules  s3rver and Azurite, exactly as package-lock.json says
#                             (Azurite 3.35.0: the newest that runs on Node 20;
#                             3.36 wants Node >= 21, 3.37 Node >= 22)
#   /usr/sbin/sshd            Debian's openssh-server (only as root, only if missing)
#   rsync, faketime           Debian's packages, likewise (the benchmark smoke test,
#                             the real-clock-skew test)
# Then run the tests with: .venv/bin/python -m pytest -n 2
# A server that cannot be installed here makes its tests skip (tests/stores.py).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "tests/install.sh: $*" >&2; }

# -- Python
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q -U "pip>=25.1"  # --group needs pip 25.1
.venv/bin/pip install -q ".[s3,gcs,azure,ssh]" --group test
# A wheelhouse of ckpt-run[s3]'s dependencies, for the offline pipx and uv
# installs of tests/packaging (fast: pip's cache is warm from the line above).
# ckpt's own wheel is left out: those tests install the one they build.
rm -rf .venv/wheelhouse
.venv/bin/pip wheel -q -w .venv/wheelhouse ".[s3]"
rm -f .venv/wheelhouse/ckpt_run-*.whl

# -- node servers (s3rver, Azurite)
if command -v npm >/dev/null 2>&1; then
    (
        cd tests/servers
        # npm ci wipes node_modules: only when the lockfile changed since the last run.
        if ! cmp -s package-lock.json node_modules/.installed-package-lock.json; then
            npm ci --no-audit --no-fund --loglevel=error </dev/null
            cp package-lock.json node_modules/.installed-package-lock.json
        fi
    )
else
    say "npm not found: the s3-s3rver and azure tests will be skipped"
fi

# -- sshd for the sftp tests
if [ ! -x /usr/sbin/sshd ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # Keep the package's postinst from starting the system sshd on port 22.
        policy_rc=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            policy_rc=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
            chmod 755 "$policy_rc"
        fi
        if ! (
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q && apt-get install -y -q openssh-server
        ) </dev/null >/dev/null; then
            say "apt-get install openssh-server failed: the sftp tests will be skipped"
        fi
        if [ -n "$policy_rc" ]; then
            rm -f "$policy_rc"
        fi
    else
        say "/usr/sbin/sshd is missing and cannot be installed here (needs root and apt): the sftp tests will be skipped"
    fi
fi

# -- rsync, a baseline of the benchmark suite (tests/bench runs its quick mode)
command -v rsync >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && (export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q rsync) </dev/null >/dev/null; } || say "rsync is missing and cannot be installed here (needs root and apt): the benchmark smoke test will be skipped"

# -- faketime (libfaketime) for the real-clock-skew test of tests/faults/test_clock_skew.py
command -v faketime >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && (export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q faketime) </dev/null >/dev/null; } || say "faketime is missing and cannot be installed here (needs root and apt): the libfaketime clock-skew test will be skipped"
