"""Upload and restore throughput of a checkpoint on every real store, next to
the store's own command-line tools, measured in the same run on the same server.

    .venv/bin/python bench/backends.py [--size-mib 1024] [--files 10] [--repeats 3]
                                       [--kinds s3-moto,s3-s3rver,azure,gcs,sftp]

Servers are the ones the test-suite uses (tests/stores.py; install them with
`bash tests/install.sh`), started on 127.0.0.1. For each kind and each repeat,
into a fresh prefix:

- `ckpt push DIR URL` (first snapshot: every byte read, hashed and uploaded),
  then `ckpt restore URL NEW_DIR` (every chunk downloaded and verified);
- `aws s3 cp --recursive` up and down (S3 kinds; AWS CLI v1 from its own
  venv: set AWS_CLI=/path/to/aws, default `aws` on PATH);
- `rclone copy` up and down (every kind rclone can reach: set RCLONE=..., default
  `rclone` on PATH; Debian's package is enough).

The payload is random bytes (nothing compresses). Figures are medians over
the repeats, in MiB/s, with ckpt's ratio to each baseline (>1: ckpt is
faster) and ckpt's peak RSS. Nothing here talks to a non-loopback address.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import stores  # noqa: E402  (the test-suite's server launchers)

CKPT = Path(sys.executable).parent / "ckpt"
MiB = 1024 * 1024
#: The stores benchmarked by default (every kind with a server).
KINDS = ("s3-moto", "s3-s3rver", "azure", "gcs", "sftp")


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Run argv; (seconds, peak RSS in KiB of that process tree's biggest member)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {code}:\n{err[-2000:]}")
    return seconds, usage.ru_maxrss


def make_payload(directory: Path, size: int, files: int) -> None:
    directory.mkdir(parents=True)
    per = size // files
    for i in range(files):
        with open(directory / f"shard-{i:02d}.bin", "wb") as f:
            left = per
            while left:
                n = min(left, 16 * MiB)
                f.write(os.urandom(n))
                left -= n


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(
        (a / p).stat().st_size == (b / p).stat().st_size for p in files_a
    )


def rclone_remote(store: Any) -> tuple[dict[str, str], str] | None:
    """(env that defines an rclone remote named B, its path for the store), or None."""
    opts = store.storage_options
    kind = store.kind
    bucket_path = store.url.split("://", 1)[1]
    if kind.startswith("s3"):
        return {
            "RCLONE_CONFIG_B_TYPE": "s3",
            "RCLONE_CONFIG_B_PROVIDER": "Other",
            "RCLONE_CONFIG_B_ACCESS_KEY_ID": opts["key"],
            "RCLONE_CONFIG_B_SECRET_ACCESS_KEY": opts["secret"],
            "RCLONE_CONFIG_B_ENDPOINT": opts["endpoint_url"],
            "RCLONE_CONFIG_B_FORCE_PATH_STYLE": "true",
        }, f"B:{bucket_path}-rclone"
    if kind == "sftp":
        host_port = store.url.split("://", 1)[1].split("/", 1)[0]
        port = host_port.rsplit(":", 1)[1]
        path = "/" + store.url.split("://", 1)[1].split("/", 1)[1]
        keys = opts.get("client_keys") or []
        return {
            "RCLONE_CONFIG_B_TYPE": "sftp",
            "RCLONE_CONFIG_B_HOST": "127.0.0.1",
            "RCLONE_CONFIG_B_PORT": port,
            "RCLONE_CONFIG_B_USER": opts.get("username", "root"),
            "RCLONE_CONFIG_B_KEY_FILE": keys[0] if keys else "",
            "RCLONE_CONFIG_B_KNOWN_HOSTS_FILE": "",
        }, f"B:{path}-rclone"
    # azure: rclone 1.60 reaches an emulator only on port 10000 (use_emulator);
    # gcs: it has no endpoint option. Both get fsspec's own bulk put/get instead.
    return None


FSSPEC_COPY = """
import json, sys, fsspec
url, options, src, dst = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
fs, root = fsspec.core.url_to_fs(url, **options)
if src:
    fs.put(src, root, recursive=True)
else:
    fs.get(root, dst, recursive=True)
"""


def fsspec_copy(store: Any, src: str, dst: str, env: dict[str, str], cwd: Path) -> float:
    """The storage library's own recursive copy (adlfs / gcsfs put and get), in
    a process of its own like the other tools; returns seconds."""
    import json

    argv = [
        sys.executable,
        "-c",
        FSSPEC_COPY,
        store.url + "-fsspec",
        json.dumps(store.storage_options),
        src,
        dst,
    ]
    return timed(argv, env, cwd)[0]


def bench_kind(kind: str, payload: Path, work: Path, repeats: int, tools: dict[str, str]) -> dict:
    (work / f"server-{kind}").mkdir()
    service = stores.start_service(kind, work / f"server-{kind}")
    base_env = {**os.environ, **stores._SAFETY_ENV}
    rows: dict[str, list[float]] = {}
    rss: list[int] = []
    size_mib = sum(p.stat().st_size for p in payload.rglob("*") if p.is_file()) / MiB
    try:
        for r in range(repeats):
            store = service.new_store()
            env = {**base_env, **store.env}
            secs, peak = timed([str(CKPT), "push", str(payload), store.url, "-q"], env, work)
            rows.setdefault("ckpt up", []).append(size_mib / secs)
            rss.append(peak)
            out = work / f"restore-{kind}-{r}"
            secs, peak = timed([str(CKPT), "restore", store.url, str(out), "-q"], env, work)
            rows.setdefault("ckpt down", []).append(size_mib / secs)
            rss.append(peak)
            if not same_tree(payload, out):
                raise RuntimeError(f"{kind}: the restored tree differs from the payload")
            shutil.rmtree(out)
            if kind.startswith("s3") and tools.get("aws"):
                aws_env = {**env, "AWS_DEFAULT_REGION": "us-east-1"}
                dest = store.url + "-aws"
                ep = ["--endpoint-url", store.storage_options["endpoint_url"], "--only-show-errors"]
                secs, _ = timed(
                    [tools["aws"], "s3", "cp", "--recursive", str(payload), dest, *ep],
                    aws_env,
                    work,
                )
                rows.setdefault("aws up", []).append(size_mib / secs)
                out = work / f"aws-{kind}-{r}"
                secs, _ = timed(
                    [tools["aws"], "s3", "cp", "--recursive", dest, str(out), *ep], aws_env, work
                )
                rows.setdefault("aws down", []).append(size_mib / secs)
                shutil.rmtree(out)
            if kind in ("azure", "gcs"):
                out = work / f"fsspec-{kind}-{r}"
                secs = fsspec_copy(store, str(payload), "", env, work)
                rows.setdefault("fsspec put up", []).append(size_mib / secs)
                secs = fsspec_copy(store, "", str(out), env, work)
                rows.setdefault("fsspec put down", []).append(size_mib / secs)
                shutil.rmtree(out)
            rc = rclone_remote(store) if tools.get("rclone") else None
            if rc is not None:
                rc_env, target = rc
                renv = {**env, **rc_env, "RCLONE_CONFIG": str(work / "no-rclone.conf")}
                renv.pop(
                    "AWS_CA_BUNDLE", None
                )  # rclone refuses a bundle with a plain-http endpoint
                flags = ["--transfers", "4", "-q"]
                secs, _ = timed([tools["rclone"], "copy", str(payload), target, *flags], renv, work)
                rows.setdefault("rclone up", []).append(size_mib / secs)
                out = work / f"rclone-{kind}-{r}"
                secs, _ = timed([tools["rclone"], "copy", target, str(out), *flags], renv, work)
                rows.setdefault("rclone down", []).append(size_mib / secs)
                shutil.rmtree(out)
            with contextlib.suppress(Exception):
                service.cleanup(store)
    finally:
        service.server.stop()
    return {"rows": rows, "rss_kib": max(rss) if rss else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    tools = {
        "aws": os.environ.get("AWS_CLI") or shutil.which("aws") or "",
        "rclone": os.environ.get("RCLONE") or shutil.which("rclone") or "",
    }
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        work = Path(tmp)
        payload = work / "payload"
        make_payload(payload, args.size_mib * MiB, args.files)
        print(
            f"payload: {args.size_mib} MiB in {args.files} files of random bytes; "
            f"median of {args.repeats}; MiB/s (higher is better)\n"
        )
        print(
            "| store | ckpt up | ckpt down | baseline | up | down | ckpt/baseline up | "
            "ckpt/baseline down | ckpt peak RSS |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for kind in args.kinds.split(","):
            try:
                res = bench_kind(kind, payload, work, args.repeats, tools)
            except (Exception, stores.pytest.skip.Exception) as exc:  # not installed: skipped
                print(f"| {kind} | failed: {exc} |")
                continue
            med = {k: statistics.median(v) for k, v in res["rows"].items()}
            up, down = med["ckpt up"], med["ckpt down"]
            rss = f"{res['rss_kib'] / 1024:.0f} MiB"
            baselines = [b for b in ("aws", "rclone", "fsspec put") if f"{b} up" in med] or ["-"]
            for b in baselines:
                if b == "-":
                    print(f"| {kind} | {up:.0f} | {down:.0f} | (none) | | | | | {rss} |")
                    continue
                bu, bd = med[f"{b} up"], med[f"{b} down"]
                print(
                    f"| {kind} | {up:.0f} | {down:.0f} | {b} | {bu:.0f} | {bd:.0f} | "
                    f"{up / bu:.2f} | {down / bd:.2f} | {rss} |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
