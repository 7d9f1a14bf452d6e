"""Case 5: first snapshot and restore through a real object-store server on
127.0.0.1 (the test-suite's, tests/stores.py), against rclone copy and
aws s3 cp --recursive up and down to the same server in the same run.

The default store is moto's S3 server; --stores adds the other servers the
test-suite runs (s3-s3rver, sftp with rclone; azure and gcs, which rclone
cannot reach here, against fsspec's own recursive put/get)."""

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    Bench,
    Case,
    MiB,
    Proc,
    Table,
    rmtree,
    same_tree,
    seconds_of,
    sync,
    timing_table,
    warm,
)

NUMBER = 5
TITLE = "Object store (S3 server on 127.0.0.1)"

#: ckpt's peak RSS limit while it uploads or downloads.
RSS_LIMIT = 200

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


def run(b: Bench) -> Case:
    a = b.args
    case = Case(NUMBER, TITLE)
    out = b.dir("c5")
    src = b.pool.dataset(out / "src", a.s3_size_mib * MiB, a.s3_files)
    size = a.s3_size_mib * MiB // a.s3_files * a.s3_files
    stores = _stores_module()
    kinds = [k.strip() for k in a.stores.split(",") if k.strip()]
    warm(src)
    for kind in kinds:
        try:
            service = stores.start_service(kind, b.dir("c5", f"server-{kind}"))
        except stores.pytest.skip.Exception as exc:
            case.notes.append(f"{kind}: not run: {exc}")
            continue
        try:
            series = _bench_kind(b, case, service, src, out)
        finally:
            service.server.stop()
        rss = [p.rss for name in ("ckpt push", "ckpt restore") for p in series[name]]
        case.tables.append(timing_table(series, size=size, title=f"{kind}: wall time"))
        rows = []
        for base in ("rclone copy", "aws s3 cp --recursive", "fsspec"):
            up, down = series.get(f"{base} (up)"), series.get(f"{base} (down)")
            if up and down:
                rows.append(
                    [
                        base,
                        f"{seconds_of(series['ckpt push']) / seconds_of(up):.3f}",
                        f"{seconds_of(series['ckpt restore']) / seconds_of(down):.3f}",
                    ]
                )
        case.tables.append(
            Table(
                ["baseline", "ckpt push / up", "ckpt restore / down"],
                rows,
                f"{kind}: ratio of medians (< 1: ckpt is faster)",
            )
        )
        if series.get("rclone copy (up)"):
            case.target(
                f"{kind}: ckpt push / rclone copy up",
                seconds_of(series["ckpt push"]) / seconds_of(series["rclone copy (up)"]),
                "<=",
                1.0,
                "x",
                "median time of ckpt push over median time of rclone copy (upload)",
            )
            case.target(
                f"{kind}: ckpt restore / rclone copy down",
                seconds_of(series["ckpt restore"]) / seconds_of(series["rclone copy (down)"]),
                "<=",
                1.0,
                "x",
                "median time of ckpt restore over median time of rclone copy (download)",
            )
        case.target(
            f"{kind}: ckpt peak RSS, push and restore",
            max(rss) / MiB,
            "<",
            RSS_LIMIT,
            "MiB",
            "largest ru_maxrss of ckpt push and ckpt restore over the runs",
        )
    case.conditions = (
        "No fsync locally (downloads go to the page cache; `sync` before each timed run); the "
        "server holds the objects in memory (moto) or on the same disk, for ckpt and the "
        "baselines alike. The source is in the page cache (read once before timing)."
    )
    case.method = [
        f"{a.s3_files} files of {size // a.s3_files / MiB:.1f} MiB (os.urandom bytes, "
        f"{size / MiB:.0f} MiB), read once before timing. The server is the test-suite's "
        f"(tests/stores.py: {', '.join(kinds)}) on 127.0.0.1, started once for the case. Each "
        "run uploads into fresh prefixes and downloads into a new local directory: `ckpt "
        "push SRC URL` (every chunk read, hashed and put) then `ckpt restore URL DST` (every "
        "chunk got and verified); `rclone copy` up and down (default 4 transfers, config "
        "file in the work dir); `aws s3 cp --recursive` up and down (AWS CLI v1 in its own "
        f"venv; slower, it runs {a.slow_runs} time(s)). Objects are deleted after each run. "
        "`sync` before each timed run. The server runs on the same 2-core machine, so its "
        "own CPU use is part of every tool's time alike.",
        "Credentials are the server's dummy ones, given explicitly (env or config file in the "
        "work dir) with AWS_EC2_METADATA_DISABLED=true and explicit endpoints: nothing is "
        "sent to a non-loopback address.",
    ]
    return case


def _bench_kind(b: Bench, case: Case, service: Any, src: Path, out: Path) -> dict[str, list[Proc]]:
    a = b.args
    kind = service.kind
    rclone, aws = b.tools["rclone"], b.tools["aws"]
    series: dict[str, list[Proc]] = {"ckpt push": [], "ckpt restore": []}
    if not aws and kind.startswith("s3"):
        case.notes.append(f"{kind}: the AWS CLI is not installed (bash bench/install.sh)")
    for r in range(a.runs):
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
            flags = ["--config", str(conf), "--transfers", "4", "-q"]
            groups.append(
                [
                    ("rclone copy (up)", [rclone, "copy", src, remote, *flags]),
                    ("rclone copy (down)", [rclone, "copy", remote, dst, *flags]),
                ]
            )
        if aws and kind.startswith("s3") and r < a.slow_runs:
            ep = ["--endpoint-url", store.storage_options["endpoint_url"], "--only-show-errors"]
            cp = [aws, "s3", "cp", "--recursive"]
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
        k = r % len(groups)
        steps = [step for group in groups[k:] + groups[:k] for step in group]
        try:
            for name, argv in steps:
                upload = name == "ckpt push" or name.endswith("(up)")
                if upload:
                    rmtree(dst)
                sync()
                series.setdefault(name, []).append(b.run(argv, env=env))
                if not upload:
                    if not same_tree(src, dst):
                        raise RuntimeError(f"{kind}: {name} did not reproduce {src}")
                    rmtree(dst)
        finally:
            for suffix in ("", "-rclone", "-aws", "-fsspec"):
                with contextlib.suppress(Exception):
                    service.cleanup(_with_url(store, store.url + suffix))
        print(f"    {kind}: run {r + 1}/{a.runs} done", flush=True)
    return series


def _with_url(store: Any, url: str) -> Any:
    import dataclasses

    return dataclasses.replace(store, url=url)
