"""Real storage servers on 127.0.0.1 for the test-suite, and the `Store` a test uses.

Every kind of remote ckpt supports is tested against a real server speaking its
protocol, started by the suite itself (installed by tests/install.sh):

    kind        server (on 127.0.0.1, a free port)          fsspec impl  persistent
    memory      none (fsspec's in-process memory://)         memory       -
    file        none (a local directory, file://)            (LocalBackend)
    s3-moto     moto_server (pip moto[s3])                   s3fs         no
    s3-s3rver   s3rver 3.7.1 (npm; checks signatures)        s3fs         yes (-d DIR)
    azure       Azurite 3.35.0 blob service (npm, in memory) adlfs        no
    gcs         gcp-storage-emulator (pip, in memory)        gcsfs        no
    sftp        Debian's /usr/sbin/sshd, internal-sftp       sshfs        yes (a tmp dir)

Fixtures (imported into tests/conftest.py, so every test can use them):

- `store`: a fresh, empty `Store` per test, parametrised over every kind
  (test ids are the kinds: `test_x[s3-moto]`). Each store is a new unique
  prefix in a bucket/container created once per server; its objects are
  deleted after the test.
- `store_of`: a factory for one specific kind: `store_of("s3-s3rver")` returns a
  fresh `Store` (call it several times for several stores). Outside a fixture
  or test, `make_store(kind, request)` does the same with a FixtureRequest.
- `servers`: the session-scoped servers behind them (one set per xdist
  worker): `servers.get("gcs")` starts that kind's server the first time a test
  needs it and returns its `Service`; all are stopped at the end of the session.
  A test rarely needs it: `store.server` is the running `Server`. Scripts
  outside pytest (bench/) use `start_service(kind, workdir)` instead.

A `Store` gives the same configuration three ways: `storage_options` for
`ckpt_cli.backends.open_backend(store.url, store.storage_options)` in-process,
`cli_options` (`-o KEY=VALUE` flags for the `ckpt` binary), and `env` (what a
user would export so `ckpt ... --remote URL` works without any -o flag). Secrets
that appear in env or cli_options are listed in `store.secrets`, so a test can
assert that none is ever printed. memory:// lives inside one process: a `ckpt`
child process cannot see a memory store. The variables in `env`, per kind:

    s3-*    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and
            AWS_ENDPOINT_URL_S3 (botocore reads them; s3fs passes no endpoint)
    azure   AZURE_STORAGE_CONNECTION_STRING (adlfs reads it)
    gcs     STORAGE_EMULATOR_HOST (gcsfs reads it), FSSPEC_GS_TOKEN=anon
    sftp    FSSPEC_SFTP_USERNAME, FSSPEC_SFTP_CLIENT_KEYS, FSSPEC_SFTP_KNOWN_HOSTS
            (asyncssh would only look in ~/.ssh, and HOME is per test)

FSSPEC_<PROTOCOL>_<KWARG> is fsspec's own configuration: read when fsspec is
imported, it supplies any storage option that is not passed explicitly.

`store.server` can be stopped and started again on the same port (data survives
only where `server.persistent`), or paused with SIGSTOP to simulate a stalled
peer. Whatever a test leaves stopped or paused is resumed/restarted after it,
so the session's server stays usable; a non-persistent server recreates its
bucket when it starts again.

A server whose program is not installed makes its tests SKIP (the reason names
the server and what is missing: run `bash tests/install.sh`); a server that is
installed but does not start is an ERROR that shows its output. Restrict the
kinds for a quick local run with CKPT_TEST_BACKENDS=memory,file,s3-moto (default:
all). Servers keep their data and logs under pytest's tmp dirs, never in $HOME.

Importing this module sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (otherwise
gcsfs stalls 60 s per request against an emulator; it is read when gcsfs is
imported), AWS_EC2_METADATA_DISABLED=true and NO_GCE_CHECK=true (no credential
lookup may ever reach a cloud metadata address) in os.environ, so child
processes the tests start inherit them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli import processes as subtree

#: Set before anything can import gcsfs / google-auth / botocore.
_SAFETY_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_GCE_CHECK": "true",
}
os.environ.update(_SAFETY_ENV)

ALL_KINDS: tuple[str, ...] = ("memory", "file", "s3-moto", "s3-s3rver", "azure", "gcs", "sftp")

TESTS_DIR = Path(__file__).resolve().parent
NODE_MODULES = TESTS_DIR / "servers" / "node_modules"
SSHD = Path("/usr/sbin/sshd")
HOST = "127.0.0.1"
#: How long a server may take to answer on its port.
READY_TIMEOUT = 60.0
#: The bucket / container every store of a server lives in (one prefix per store).
BUCKET = "ckpt-test"
#: Azurite's well-known development account (public; documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
#: s3rver only accepts this key pair (it verifies the request signatures).
S3RVER_KEY = "S3RVER"


def _selected_kinds() -> tuple[str, ...]:
    raw = os.environ.get("CKPT_TEST_BACKENDS", "").strip()
    if not raw:
        return ALL_KINDS
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise ValueError(
            f"CKPT_TEST_BACKENDS names unknown kinds {unknown}; known: {', '.join(ALL_KINDS)}"
        )
    return tuple(k for k in ALL_KINDS if k in kinds)


#: The kinds `store` is parametrised over (CKPT_TEST_BACKENDS, default all).
KINDS = _selected_kinds()


class ServerError(RuntimeError):
    """An installed server did not start (its output is in the message)."""


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every live process below pid (sshd's per-connection children, say)."""
    return [p.pid for p in subtree.live(pid)]


def _prctl_pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies, so
    a crashed pytest worker leaves no server behind (Linux only). Loaded here,
    in the parent: the forked child only makes the call."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


_DIE_WITH_PARENT = _prctl_pdeathsig()


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass(eq=False)
class Server:
    """One running server process, on a fixed port for its whole life."""

    kind: str
    port: int
    pid: int | None
    persistent: bool  # True when stop()+start() keeps the data (s3rver -d DIR, sshd, file)
    argv: list[str] = field(default_factory=list, repr=False)
    log: Path = field(default=Path("/dev/null"), repr=False)
    cwd: Path | None = field(default=None, repr=False)
    env: dict[str, str] | None = field(default=None, repr=False)
    #: Called after every start once the port answers (creates the bucket).
    on_start: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _paused: list[int] = field(default_factory=list, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    def output(self, since: int = 0, limit: int = 6000) -> str:
        """What the server printed (stdout and stderr) since byte offset `since`."""
        try:
            with open(self.log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def _log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def start(self) -> None:
        """Start (again) on the same port; return once it answers there."""
        if self.running:
            return
        since = self._log_size()
        # The death signal fires when the *thread* that started the child ends:
        # only tie it to the main thread, which lives as long as the worker.
        main = threading.current_thread() is threading.main_thread()
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # signals to the test process are not its own
                preexec_fn=_DIE_WITH_PARENT if main else None,  # noqa: PLW1509
            )
        self.pid = self._proc.pid
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._proc = None
                self.pid = None
                raise ServerError(
                    f"{self.kind} server exited with status {rc} before answering on "
                    f"{HOST}:{self.port}\n$ {' '.join(self.argv)}\n{self.output(since)}"
                )
            if _answers(self.port) and self._proc.poll() is None:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.kind} server did not answer on {HOST}:{self.port} within "
                    f"{READY_TIMEOUT:.0f}s\n$ {' '.join(self.argv)}\n{self.output(since)}"
                )
            time.sleep(0.05)
        for hook in self.on_start:
            hook()

    def stop(self) -> None:
        """SIGTERM the server and its children, wait, then SIGKILL; idempotent."""
        proc = self._proc
        if proc is None:
            return
        pids = [proc.pid, *_descendants(proc.pid)]
        if self._paused:
            self.resume()
        _signal(pids, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal(pids, signal.SIGKILL)
            proc.wait()
        # children that outlived their parent (sshd's connection processes)
        deadline = time.monotonic() + 2
        while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal([p for p in pids[1:] if _alive(p)], signal.SIGKILL)
        self._proc = None
        self.pid = None

    def pause(self) -> None:
        """SIGSTOP the server and its children: a peer that stops answering."""
        if self._proc is None:
            raise RuntimeError(f"{self.kind} server is not running")
        pids = [self._proc.pid, *_descendants(self._proc.pid)]
        _signal(pids, signal.SIGSTOP)
        self._paused = pids

    def resume(self) -> None:
        """SIGCONT what pause() stopped."""
        pids, self._paused = self._paused, []
        if self._proc is not None:
            pids = [*pids, *_descendants(self._proc.pid)]
        _signal(pids, signal.SIGCONT)


def _alive(pid: int) -> bool:
    proc = subtree.read_proc(pid)
    return proc is not None and not proc.gone


def _launch(
    kind: str,
    workdir: Path,
    argv_for: Callable[[int], list[str]],
    *,
    persistent: bool,
    env: dict[str, str] | None = None,
) -> Server:
    """Start a server on a free port (another port if a racing process took it)."""
    base_env = {**os.environ, "HOME": str(workdir), **(env or {})}
    last: ServerError | None = None
    for _attempt in range(3):
        port = free_port()
        server = Server(
            kind,
            port,
            None,
            persistent,
            argv=argv_for(port),
            log=workdir / "server.log",
            cwd=workdir,
            env=base_env,
        )
        try:
            server.start()
        except ServerError as exc:
            last = exc
            if not any(s in str(exc).lower() for s in ("in use", "eaddrinuse")):
                raise
            continue
        return server
    assert last is not None
    raise last


def _need_module(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{what}: Python module {module!r} is not installed (bash tests/install.sh)")


def _need_node_script(rel: str, what: str) -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"{what}: node is not installed (it runs {rel})")
    script = NODE_MODULES / rel
    if not script.is_file():
        pytest.skip(f"{what}: {script} is missing (bash tests/install.sh runs npm ci)")
    return [node, str(script)]


# ---------------------------------------------------------------- stores


@dataclass
class Store:
    """A fresh, empty remote location for one test, and how to reach it."""

    kind: str  # one of ALL_KINDS
    url: str  # a unique location for this test, e.g. s3://ckpt-test/<uuid hex>
    storage_options: dict[str, Any]  # open_backend(url, storage_options) works
    env: dict[str, str]  # what a user exports so `ckpt ... --remote URL` works without -o
    cli_options: list[str]  # the same as ckpt flags: ["-o", "key=value", ...]
    server: Server | None  # None for memory and file
    secrets: list[str]  # every secret string in env / cli_options

    def backend(self) -> Any:
        """ckpt's Backend for this store (ckpt_cli.backends.open_backend)."""
        from ckpt_cli.backends import open_backend

        return open_backend(self.url, self.storage_options)


def _cli_options(options: dict[str, Any], prefix: str = "") -> list[str]:
    """storage_options -> ["-o", "key=value", ...] as parse_storage_options reads them."""
    out: list[str] = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += _cli_options(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out += ["-o", f"{prefix}{key}={text}"]
    return out


@dataclass
class Service:
    """A started server, and how to make stores on it."""

    kind: str
    server: Server
    options: dict[str, Any]  # storage_options (without the per-store part)
    env: dict[str, str]
    secrets: list[str]
    url_for: Callable[[str], str]  # unique name -> url

    def new_store(self) -> Store:
        name = uuid.uuid4().hex
        options = json.loads(json.dumps(self.options))  # a private deep copy
        return Store(
            kind=self.kind,
            url=self.url_for(name),
            storage_options=options,
            env={**_SAFETY_ENV, **self.env},
            cli_options=_cli_options(options),
            server=self.server,
            secrets=list(self.secrets),
        )

    def cleanup(self, store: Store) -> None:
        """Leave the server usable for the next test; delete the store's objects."""
        server = self.server
        if server.paused:
            server.resume()
        if not server.running:
            server.start()
        if store.kind == "sftp":
            shutil.rmtree(store.url.split(f":{server.port}", 1)[1], ignore_errors=True)
            return
        import fsspec

        with contextlib.suppress(Exception):
            fs, root = fsspec.core.url_to_fs(store.url, **store.storage_options)
            fs.invalidate_cache()
            if fs.find(root):
                fs.rm(root, recursive=True)


def _s3_service(kind: str, server: Server, key: str, secret: str, *, secrets: list[str]) -> Service:
    endpoint = f"http://{HOST}:{server.port}"

    def make_bucket() -> None:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=key, secret=secret, endpoint_url=endpoint, skip_instance_cache=True
        )
        if not fs.exists(BUCKET):
            # No region: s3fs would send it as LocationConstraint, and us-east-1
            # is not a valid constraint (moto refuses it like AWS does).
            fs.call_s3("create_bucket", Bucket=BUCKET)

    server.on_start.append(make_bucket)
    make_bucket()
    return Service(
        kind=kind,
        server=server,
        options={
            "key": key,
            "secret": secret,
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        },
        # botocore reads all of these itself; s3fs passes no endpoint, so
        # AWS_ENDPOINT_URL_S3 (botocore >= 1.31) is honoured.
        env={
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        },
        secrets=secrets,
        url_for=lambda name: f"s3://{BUCKET}/{name}",
    )


def _start_moto(workdir: Path) -> Service:
    _need_module("s3fs", "s3-moto")
    _need_module("moto.server", "s3-moto (moto_server)")
    _need_module("flask_cors", "s3-moto (moto_server)")
    server = _launch(
        "s3-moto",
        workdir,
        lambda port: [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        persistent=False,
    )
    # moto accepts any key pair: a random secret is one no output can contain by chance.
    secret = f"moto-secret-{uuid.uuid4().hex}"
    return _s3_service("s3-moto", server, "ckpt-moto-key", secret, secrets=[secret])


def _start_s3rver(workdir: Path) -> Service:
    _need_module("s3fs", "s3-s3rver")
    cmd = _need_node_script("s3rver/bin/s3rver.js", "s3-s3rver (npm s3rver)")
    data = workdir / "data"
    data.mkdir()
    server = _launch(
        "s3-s3rver",
        workdir,
        lambda port: [
            *cmd,
            "-d",
            str(data),
            "-a",
            HOST,
            "-p",
            str(port),
            "--silent",
            "--no-vhost-buckets",
        ],
        persistent=True,
    )
    return _s3_service("s3-s3rver", server, S3RVER_KEY, S3RVER_KEY, secrets=[S3RVER_KEY])


def _start_azurite(workdir: Path) -> Service:
    _need_module("adlfs", "azure")
    cmd = _need_node_script("azurite/dist/src/blob/main.js", "azure (npm azurite)")
    server = _launch(
        "azure",
        workdir,
        lambda port: [
            *cmd,
            "--blobHost",
            HOST,
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--silent",
        ],
        persistent=False,
    )
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://{HOST}:{server.port}/{AZURITE_ACCOUNT};"
    )

    def make_container() -> None:
        import adlfs

        fs = adlfs.AzureBlobFileSystem(connection_string=conn, skip_instance_cache=True)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)

    server.on_start.append(make_container)
    make_container()
    return Service(
        kind="azure",
        server=server,
        options={"connection_string": conn},
        env={"AZURE_STORAGE_CONNECTION_STRING": conn},  # adlfs reads it itself
        secrets=[conn, AZURITE_KEY],
        url_for=lambda name: f"az://{BUCKET}/{name}",
    )


def _start_gcs(workdir: Path) -> Service:
    _need_module("gcsfs", "gcs")
    _need_module("gcp_storage_emulator", "gcs (gcp-storage-emulator)")
    server = _launch(
        "gcs",
        workdir,
        lambda port: [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            HOST,
            "--port",
            str(port),
            "-q",
            "--in-memory",
        ],
        persistent=False,
    )
    endpoint = f"http://{HOST}:{server.port}"

    def make_bucket() -> None:
        import gcsfs

        fs = gcsfs.GCSFileSystem(
            token="anon", endpoint_url=endpoint, project=BUCKET, skip_instance_cache=True
        )
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)

    server.on_start.append(make_bucket)
    make_bucket()
    return Service(
        kind="gcs",
        server=server,
        options={"token": "anon", "endpoint_url": endpoint},
        env={
            # gcsfs reads STORAGE_EMULATOR_HOST itself; the token comes from
            # fsspec's own FSSPEC_<protocol>_<kwarg> configuration variables.
            "STORAGE_EMULATOR_HOST": endpoint,
            "FSSPEC_GS_TOKEN": "anon",
        },
        secrets=[],
        url_for=lambda name: f"gs://{BUCKET}/{name}",
    )


def _start_sshd(workdir: Path) -> Service:
    _need_module("sshfs", "sftp")
    if not SSHD.is_file():
        pytest.skip(f"sftp: {SSHD} is missing (apt-get install openssh-server)")
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("sftp: ssh-keygen is missing (apt-get install openssh-client)")
    privsep = Path("/run/sshd")  # sshd refuses to start without it
    if not privsep.is_dir():
        if os.geteuid() != 0:
            pytest.skip(f"sftp: sshd needs {privsep}, which only root can create")
        privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    host_key, user_key = workdir / "host_ed25519", workdir / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"ckpt-test-{key.stem}", "-f", key],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
    authorized = workdir / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    authorized.chmod(0o600)
    root = workdir / "root"
    root.mkdir()

    def argv(port: int) -> list[str]:
        config = workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    f"ListenAddress {HOST}",
                    f"HostKey {host_key}",
                    f"PidFile {workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    f"AllowUsers {user}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "PrintMotd no",
                    "MaxSessions 64",
                    "MaxStartups 64",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        return [str(SSHD), "-D", "-e", "-f", str(config)]

    server = _launch("sftp", workdir, argv, persistent=True)
    known_hosts = workdir / "known_hosts"
    key_type, key_b64 = Path(f"{host_key}.pub").read_text().split()[:2]
    known_hosts.write_text(f"[{HOST}]:{server.port} {key_type} {key_b64}\n")
    return Service(
        kind="sftp",
        server=server,
        options={
            "username": user,
            "client_keys": [str(user_key)],
            "known_hosts": str(known_hosts),  # the server's real key: verified
        },
        # asyncssh would look in ~/.ssh (and HOME is per test): fsspec's own
        # FSSPEC_SFTP_<kwarg> variables carry the same options.
        env={
            "FSSPEC_SFTP_USERNAME": user,
            "FSSPEC_SFTP_CLIENT_KEYS": str(user_key),
            "FSSPEC_SFTP_KNOWN_HOSTS": str(known_hosts),
        },
        secrets=[],  # the private key is a file; only its path is in options
        url_for=lambda name: f"sftp://{HOST}:{server.port}{root}/{name}",
    )


_STARTERS: dict[str, Callable[[Path], Service]] = {
    "s3-moto": _start_moto,
    "s3-s3rver": _start_s3rver,
    "azure": _start_azurite,
    "gcs": _start_gcs,
    "sftp": _start_sshd,
}


def start_service(kind: str, workdir: Path) -> Service:
    """Start the server of `kind` (not memory or file) with its data in workdir
    (a new, empty directory); pytest.skip() if it is not installed. The caller
    stops it: `service.server.stop()`."""
    return _STARTERS[kind](workdir)


class Servers:
    """This worker's servers, each started the first time a test asks for it.
    A kind that could not start (skipped, or an error) is not tried again."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._factory = tmp_path_factory
        self._started: dict[str, Service] = {}
        self._failed: dict[str, BaseException] = {}

    def get(self, kind: str) -> Service:
        if kind in self._started:
            return self._started[kind]
        if kind in self._failed:
            raise self._failed[kind]
        workdir = self._factory.mktemp(f"server-{kind}")
        try:
            service = start_service(kind, workdir)
        except (Exception, pytest.skip.Exception) as exc:
            self._failed[kind] = exc
            raise
        self._started[kind] = service
        return service

    def stop_all(self) -> None:
        for service in self._started.values():
            service.server.stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """This worker's servers (started lazily by `servers.get(kind)`), stopped at the end."""
    registry = Servers(tmp_path_factory)
    try:
        yield registry
    finally:
        registry.stop_all()


def make_store(kind: str, request: pytest.FixtureRequest) -> Store:
    """A fresh Store of one kind for the test of `request` (starts its server
    if this worker has not yet); its objects are deleted after the test."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown store kind {kind!r}; known: {', '.join(ALL_KINDS)}")
    if kind not in KINDS:
        pytest.skip(f"{kind}: not in CKPT_TEST_BACKENDS={os.environ['CKPT_TEST_BACKENDS']}")
    if kind == "memory":
        import fsspec

        path = f"/ckpt-test-{uuid.uuid4().hex}"

        def forget() -> None:
            with contextlib.suppress(FileNotFoundError):
                fsspec.filesystem("memory").rm(path, recursive=True)

        request.addfinalizer(forget)
        return Store(kind, f"memory://{path}", {}, dict(_SAFETY_ENV), [], None, [])
    if kind == "file":
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        path = factory.mktemp("file-store") / "remote"
        return Store(kind, f"file://{path}", {}, dict(_SAFETY_ENV), [], None, [])
    registry: Servers = request.getfixturevalue("servers")
    service = registry.get(kind)
    store = service.new_store()
    request.addfinalizer(lambda: service.cleanup(store))
    return store


@pytest.fixture(params=KINDS, ids=list(KINDS))
def store(request: pytest.FixtureRequest) -> Store:
    """A fresh, empty Store; the test runs once per kind (see the module docstring)."""
    return make_store(request.param, request)


@pytest.fixture
def store_of(request: pytest.FixtureRequest) -> Callable[[str], Store]:
    """store_of("s3-s3rver") -> a fresh Store of that kind (see the module docstring)."""
    return lambda kind: make_store(kind, request)
