"""Case 5: first snapshot and restore through a real object-store server on
127.0.0.1 (the test-suite's, tests/stores.py), against rclone copy and
aws s3 cp --recursive up and down to the same server in the same run, for
each data set of --s3-sets (many files; few big shards, where one file must be
fetched by many requests at once).

The default stores are moto's S3 server and s3rver; --stores takes the other
servers the test-suite runs too (sftp with rclone; azure and gcs, which rclone
cannot reach here, against fsspec's own recursive put/get)."""

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from _common import (
    MIN,
    ROOT,
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    how,
    judged,
    median,
    ratio_table,
    rmtree,
    rotate,
    same_tree,
    sync,
    timing_table,
    warm,
)

NUMBER = 5
TITLE = "Object store (S3 server on 127.0.0.1)"

#: ckpt's peak RSS limit while it uploads or downloads.
RSS_LIMIT = 200
#: ckpt push and restore against rclone copy up and down (issue 18).
LIMIT = 0.8
TICK = os.sysconf("SC_CLK_TCK")

FSSPEC_COPY = """
import json, sys, fsspec
url, options, src, dst = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
fs, root = fsspec.core.url_to_fs(url, **options)
if src:
    fs.put(src, root, recursive=True)
else:
    fs.get(root, dst, recursive=True)
"""


def _stores_module() -> Any:
    """tests/stores.py: the test-suite's launchers of the servers."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import stores

    return stores


def rclone_section(store: Any, name: str) -> str | None:
    """An rclone.conf section that reaches the store (or None), for `name:PATH`."""
    opts = store.storage_options
    if store.kind.startswith("s3"):
        lines = {
            "type": "s3",
            "provider": "Other",
            "access_key_id": opts["key"],
            "secret_access_key": opts["secret"],
            "endpoint": opts["endpoint_url"],
            "region": "us-east-1",
            "force_path_style": "true",
            "env_auth": "false",
        }
    elif store.kind == "sftp":
        host_port, _path = store.url.split("://", 1)[1].split("/", 1)
        lines = {
            "type": "sftp",
            "host": "127.0.0.1",
            "port": host_port.rsplit(":", 1)[1],
            "user": opts["username"],
            "key_file": opts["client_keys"][0],
            "known_hosts_file": opts["known_hosts"],
        }
    else:
        # rclone 1.60 reaches an Azure emulator only on port 10000 and has no
        # endpoint option for GCS: fsspec's put/get is their baseline.
        return None
    return f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())


def rclone_path(store: Any) -> str:
    rest = store.url.split("://", 1)[1]
    if store.kind == "sftp":
        return "/" + rest.split("/", 1)[1] + "-rclone"
    return rest + "-rclone"


def sets_of(spec: str) -> list[tuple[int, int]]:
    """ "1024x10,4096x2" -> [(1024, 10), (4096, 2)]: (MiB, files) of each data set."""
    out = []
    for part in spec.split(","):
        size, _, files = part.strip().partition("x")
        out.append((int(size), int(files or 1)))
    return out


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c5")
    stores = _stores_module()
    kinds = [k.strip() for k in a.stores.split(",") if k.strip()]
    shapes = sets_of(a.s3_sets)
    peak: dict[str, int] = {}
    for kind in kinds:
        try:
            service = stores.start_service(kind, b.dir("c5", f"server-{kind}"))
        except stores.pytest.skip.Exception as exc:
            case.notes.append(f"{kind}: not run: {exc}")
            continue
        try:
            for n, (size_mib, files) in enumerate(shapes):
                src = b.pool.dataset(out / "src", size_mib * MiB, files)
                size = size_mib * MiB // files * files
                shape = f"{size / MiB:.0f} MiB in {files} files"
                warm(src)
                served: dict[str, list[float]] = {}
                series = _bench_kind(b, case, service, src, out, served, aws=n == 0)
                rmtree(src)
                _report(case, kind, shape, size, series, served)
                rss = max(p.rss for name in ("ckpt push", "ckpt restore") for p in series[name])
                peak[kind] = max(peak.get(kind, 0), rss)
        finally:
            service.server.stop()
    for kind, rss in peak.items():
        case.target(
            f"{kind}: ckpt peak RSS, push and restore, every data set",
            rss / MiB,
            "<",
            RSS_LIMIT,
            "MiB",
            "largest ru_maxrss of ckpt push and ckpt restore over every run and data set",
        )
    case.conditions = (
        "No fsync locally (downloads go to the page cache; `sync` before each timed run); the "
        "server keeps the objects in temp files (moto spools every object above 5 MiB to "
        "disk) or in its data directory (s3rver), for ckpt and the baselines alike. The "
        "source is in the page cache (read once before timing)."
    )
    shapes_text = " and ".join(f"{m} MiB in {f} files" for m, f in shapes)
    case.method = [
        f"Data sets: {shapes_text} (os.urandom bytes), each read once before timing. The "
        f"servers are the test-suite's (tests/stores.py: {', '.join(kinds)}) on 127.0.0.1, "
        "each started once for the case. Each round uploads into fresh prefixes and "
        "downloads into a new local directory: `ckpt push SRC URL` (every chunk read, "
        "hashed and put) then `ckpt restore URL DST` (every chunk got and verified); `rclone "
        "copy` up and down with its defaults (4 transfers; files above 250 MiB are downloaded "
        "by 4 streams at once and uploaded in 5 MiB parts, 4 at once; config file in the "
        "work dir); `aws s3 cp --recursive` up and down on the first data set only (AWS CLI v1 "
        f"in its own venv; slower, it runs {a.slow_runs} time(s)). The tools take turns going "
        "first; objects are deleted after each round. `sync` before each timed run. The "
        "server runs on the same 2-core machine, so its own CPU use is part of every tool's "
        "time alike.",
        "Credentials are the server's dummy ones, given explicitly (env or config file in the "
        "work dir) with AWS_EC2_METADATA_DISABLED=true and explicit endpoints: nothing is "
        "sent to a non-loopback address.",
    ]
    return case


def server_cpu(pid: int | None) -> float:
    """utime + stime of the server process so far, in seconds (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _report(
    case: Case,
    kind: str,
    shape: str,
    size: int,
    series: dict[str, list[Proc]],
    served: dict[str, list[float]],
) -> None:
    case.tables.append(
        timing_table(series, size=size, cpu=True, title=f"{kind}, {shape}: wall time")
    )
    case.tables.append(
        Table(
            ["tool", "server CPU s (median)", "runs (s)"],
            [
                [name, f"{median(v):.2f}", ", ".join(f"{x:.2f}" for x in v)]
                for name, v in served.items()
                if v
            ],
            f"{kind}, {shape}: the server's own CPU (utime + stime) during each run",
        )
    )
    for ours, direction in (("ckpt push", "up"), ("ckpt restore", "down")):
        pairs = {ours: series[ours]}
        pairs.update(
            {name: procs for name, procs in series.items() if name.endswith(f"({direction})")}
        )
        case.tables.append(
            ratio_table(pairs, ours, f"{kind}, {shape}: {ours} against the baselines")
        )
    if series.get("rclone copy (up)"):
        for ours, base, what in (
            ("ckpt push", "rclone copy (up)", "push / rclone copy up"),
            ("ckpt restore", "rclone copy (down)", "restore / rclone copy down"),
        ):
            case.target(
                f"{kind}, {shape}: ckpt {what}",
                judged(series[ours], series[base], MIN),
                "<=",
                LIMIT,
                "x",
                how(MIN, ours, base),
            )


def _bench_kind(
    b: Bench,
    case: Case,
    service: Any,
    src: Path,
    out: Path,
    served: dict[str, list[float]],
    *,
    aws: bool,
) -> dict[str, list[Proc]]:
    a = b.args
    kind = service.kind
    rclone, aws_cli = b.tools["rclone"], b.tools["aws"] if aws else ""
    series: dict[str, list[Proc]] = {"ckpt push": [], "ckpt restore": []}
    if aws and not b.tools["aws"] and kind.startswith("s3"):
        case.notes.append(f"{kind}: the AWS CLI is not installed (bash bench/install.sh)")
    for r in range(a.s3_runs):
        store = service.new_store()
        env = {**b.env, **store.env}
        dst = out / "dst"
        # Groups of (name, argv) that go together (up, then down); the groups
        # take turns going first.
        groups: list[list[tuple[str, list[Any]]]] = [
            [
                ("ckpt push", [b.ckpt, "push", "-q", src, store.url]),
                ("ckpt restore", [b.ckpt, "restore", "-q", store.url, dst]),
            ]
        ]
        section = rclone_section(store, "bench") if rclone else None
        if section:
            conf = b.work / "rclone.conf"
            conf.write_text(section)
            remote = f"bench:{rclone_path(store)}"
            flags = ["--config", str(conf), "-q"]
            groups.append(
                [
                    ("rclone copy (up)", [rclone, "copy", src, remote, *flags]),
                    ("rclone copy (down)", [rclone, "copy", remote, dst, *flags]),
                ]
            )
        if aws_cli and kind.startswith("s3") and r < a.slow_runs:
            ep = ["--endpoint-url", store.storage_options["endpoint_url"], "--only-show-errors"]
            cp = [aws_cli, "s3", "cp", "--recursive"]
            groups.append(
                [
                    ("aws s3 cp --recursive (up)", [*cp, src, f"{store.url}-aws", *ep]),
                    ("aws s3 cp --recursive (down)", [*cp, f"{store.url}-aws", dst, *ep]),
                ]
            )
        if kind in ("azure", "gcs"):
            url, opts = f"{store.url}-fsspec", json.dumps(store.storage_options)
            groups.append(
                [
                    ("fsspec (up)", [b.python, "-c", FSSPEC_COPY, url, opts, src, ""]),
                    ("fsspec (down)", [b.python, "-c", FSSPEC_COPY, url, opts, "", dst]),
                ]
            )
        steps = [step for group in rotate(groups, r) for step in group]
        try:
            for name, argv in steps:
                upload = name == "ckpt push" or name.endswith("(up)")
                if upload:
                    rmtree(dst)
                sync()
                cpu0 = server_cpu(service.server.pid)
                series.setdefault(name, []).append(b.run(argv, env=env))
                served.setdefault(name, []).append(server_cpu(service.server.pid) - cpu0)
                if not upload:
                    if not same_tree(src, dst):
                        raise RuntimeError(f"{kind}: {name} did not reproduce {src}")
                    rmtree(dst)
        finally:
            for suffix in ("", "-rclone", "-aws", "-fsspec"):
                with contextlib.suppress(Exception):
                    service.cleanup(_with_url(store, store.url + suffix))
        print(f"    {kind}, {src.name}: run {r + 1}/{a.s3_runs} done", flush=True)
    return series


def _with_url(store: Any, url: str) -> Any:
    import dataclasses

    return dataclasses.replace(store, url=url)
