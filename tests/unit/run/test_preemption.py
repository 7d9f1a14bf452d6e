"""Preemption pollers (ckpt_cli.run.preemption) against fake metadata services.

Every poller here talks to the fake AWS / GCP / Azure services of
tests/metadata.py on 127.0.0.1. An autouse guard makes any attempt to resolve a
name or open a connection to a non-loopback address fail the test before a
packet leaves: a bug in a poller cannot reach 169.254.169.254 or
metadata.google.internal from the suite. The default (real) metadata addresses
are only ever compared as strings.

Timeouts below are hang guards only (HANG), never performance thresholds.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli.errors import ConfigError
from ckpt_cli.run import preemption
from ckpt_cli.run.preemption import (
    ENV_METADATA_URL,
    MetadataError,
    Notice,
    Poller,
    detect,
    poller_for,
)
from metadata import (  # tests/ is on sys.path, as for `stores`
    AWS_ACTION_PATH,
    AWS_TOKEN_PATH,
    AZURE_EVENTS_PATH,
    AZURE_NAME_PATH,
    GCP_PREEMPTED_PATH,
    MetadataServer,
    running,
)

# The `metadata` fixture, registered under its own name; imported under
# another one so that test parameters named `metadata` do not shadow an import.
from metadata import metadata as _metadata_fixture  # noqa: F401

#: Hang guard for anything that should happen at once (a thread returning, a
#: notice arriving): generous, and shorter than GCP's 60 s wait_for_change.
HANG = 30.0
#: A poll interval short enough that a test never waits on it.
FAST = 0.01
CLOUDS = ("aws", "gcp", "azure")
AZURE_TAG = "7783-7084-3265-9085-8269-3286-77"

# ------------------------------------------------------------------ the guard


class OffLoopbackError(AssertionError):
    """A test tried to reach a non-loopback address (not an OSError, so no
    poller can swallow it as a transport error)."""


def _loopback(host: object) -> bool:
    if host is None:  # getaddrinfo(None, port): the local wildcard / loopback
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_packet_off_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse, in-process, every name lookup and connection that is not
    loopback; whatever was attempted fails the test even if it happened in a
    watcher thread."""
    attempts: list[str] = []

    def refuse(what: str) -> None:
        attempts.append(what)
        raise OffLoopbackError(f"a test tried to leave loopback: {what}")

    def check_address(sock: socket.socket, address: Any, what: str) -> None:
        if sock.family == socket.AF_UNIX:
            return
        host = address[0] if isinstance(address, tuple) and address else address
        if not _loopback(host):
            refuse(f"{what}({address!r})")

    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        check_address(self, address, "connect")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check_address(self, address, "connect_ex")
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        check_address(self, args[-1], "sendto")
        return real_sendto(self, data, *args)  # type: ignore[arg-type]

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _loopback(host):
            refuse(f"getaddrinfo({host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    def by_name(name: str) -> Callable[..., Any]:
        real = getattr(socket, name)

        def lookup(host: Any, *args: Any) -> Any:
            if not _loopback(host):
                refuse(f"{name}({host!r})")
            return real(host, *args)

        return lookup

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, by_name(name))
    yield attempts
    assert not attempts, f"non-loopback network access attempted: {attempts}"


@pytest.fixture(autouse=True)
def _no_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_METADATA_URL, raising=False)


def test_guard_refuses_off_loopback_addresses(no_packet_off_loopback: list[str]) -> None:
    """The guard itself: only the predicate and the patching are checked, so a
    broken guard cannot send anything either."""
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost", None):
        assert _loopback(host), host
    for host in ("169.254.169.254", "metadata.google.internal", "fd00:ec2::254", "10.0.0.1", ""):
        assert not _loopback(host), host
    assert socket.socket.connect.__name__ == "connect"
    assert socket.socket.connect.__module__ == __name__
    assert socket.getaddrinfo.__module__ == __name__
    assert no_packet_off_loopback == []


# ------------------------------------------------------------------ helpers


def make(cloud: str, server: MetadataServer, *, interval: float = FAST) -> Poller:
    poller = poller_for(cloud, base_url=server.url, interval=interval)
    assert poller is not None
    assert poller.cloud == cloud
    return poller


@dataclass
class Watching:
    """poller.watch() running in a daemon thread, with what it reported."""

    poller: Poller
    stop: threading.Event = field(default_factory=threading.Event)
    notices: list[Notice] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    noticed: threading.Event = field(default_factory=threading.Event)
    crashed: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> Watching:
        def run() -> None:
            try:
                self.poller.watch(self.stop, self._on_notice, self.errors.append)
            except BaseException as exc:  # the assertion below names it
                self.crashed.append(exc)

        self.thread = threading.Thread(target=run, name="watch", daemon=True)
        self.thread.start()
        return self

    def _on_notice(self, notice: Notice) -> None:
        self.notices.append(notice)
        self.noticed.set()

    def wait_notice(self, timeout: float = HANG) -> Notice:
        assert self.thread is not None
        deadline = time.monotonic() + timeout
        while not self.noticed.wait(0.02):
            if not self.thread.is_alive():
                break
            if time.monotonic() > deadline:
                break
        assert not self.crashed, f"watch() raised {self.crashed[0]!r}"
        assert self.noticed.is_set(), (
            f"no notice within {timeout}s (errors reported: {self.errors})"
        )
        return self.notices[0]

    def returned(self, timeout: float = HANG) -> bool:
        assert self.thread is not None
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def watch() -> Iterator[Callable[[Poller], Watching]]:
    started: list[Watching] = []

    def start(poller: Poller) -> Watching:
        w = Watching(poller).start()
        started.append(w)
        return w

    yield start
    for w in started:  # the server fixture (torn down next) releases any hanging request
        w.stop.set()


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """A raw request to the fake (status, body, headers); no proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with opener.open(req, timeout=HANG) as resp:
            return resp.status, resp.read(), dict(resp.headers.items())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), dict(exc.headers.items())


def schedule(server: MetadataServer, cloud: str) -> tuple[str, float | None]:
    """Put a notice out on `cloud`; (the action expected, the deadline expected)."""
    if cloud == "aws":
        return "terminate", server.aws_schedule("terminate", 120)
    if cloud == "gcp":
        server.gcp_preempt()
        return "preempted", time.time() + preemption.GCP_WINDOW
    before = time.time()
    server.azure_schedule("Preempt", 30)
    return "Preempt", before + 30


# ------------------------------------------------------------------ AWS


def test_aws_no_notice_uses_a_token(metadata: MetadataServer) -> None:
    poller = make("aws", metadata)
    assert poller.check() is None
    reqs = metadata.requests
    assert [(r.method, r.path) for r in reqs] == [("PUT", AWS_TOKEN_PATH), ("GET", AWS_ACTION_PATH)]
    ttl = int(reqs[0].headers["x-aws-ec2-metadata-token-ttl-seconds"])
    assert 1 <= ttl <= 21600
    assert reqs[1].headers["x-aws-ec2-metadata-token"] == metadata.aws_tokens[0]
    assert all("x-forwarded-for" not in r.headers for r in reqs)


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_aws_notice(metadata: MetadataServer, action: str) -> None:
    poller = make("aws", metadata)
    when = metadata.aws_schedule(action, in_seconds=120)
    notice = poller.check()
    assert notice is not None
    assert (notice.cloud, notice.action) == ("aws", action)
    assert notice.deadline is not None
    assert abs(notice.deadline - when) <= 1.0
    assert notice.detail


def test_aws_reuses_its_token(metadata: MetadataServer) -> None:
    poller = make("aws", metadata)
    for _ in range(3):
        assert poller.check() is None
    puts = [r for r in metadata.requests if r.method == "PUT"]
    assert len(puts) == 1
    assert len(metadata.aws_tokens) == 1


def test_aws_fetches_a_new_token_after_401(metadata: MetadataServer) -> None:
    poller = make("aws", metadata)
    assert poller.check() is None
    metadata.aws_expire_tokens()
    when = metadata.aws_schedule("stop", in_seconds=120)
    notice = poller.check()
    assert notice is not None
    assert notice.action == "stop"
    assert notice.deadline is not None
    assert abs(notice.deadline - when) <= 1.0
    reqs = metadata.requests
    assert [(r.method, r.path) for r in reqs] == [
        ("PUT", AWS_TOKEN_PATH),
        ("GET", AWS_ACTION_PATH),
        ("GET", AWS_ACTION_PATH),  # the expired token: 401
        ("PUT", AWS_TOKEN_PATH),
        ("GET", AWS_ACTION_PATH),
    ]
    first, second = metadata.aws_tokens
    assert first != second
    assert reqs[2].headers["x-aws-ec2-metadata-token"] == first
    assert reqs[4].headers["x-aws-ec2-metadata-token"] == second


def test_aws_token_refused_is_an_error(metadata: MetadataServer) -> None:
    poller = make("aws", metadata)
    metadata.fail_next(1, status=403)  # IMDS turned off: the PUT is refused
    with pytest.raises(MetadataError):
        poller.check()


# ------------------------------------------------------------------ GCP


def test_gcp_no_notice_is_one_request_with_the_flavor_header(metadata: MetadataServer) -> None:
    poller = make("gcp", metadata)
    assert poller.check() is None
    (req,) = metadata.requests
    assert (req.method, req.path) == ("GET", GCP_PREEMPTED_PATH)  # no wait_for_change
    assert req.headers["metadata-flavor"] == "Google"
    assert "x-forwarded-for" not in req.headers


def test_gcp_notice(metadata: MetadataServer) -> None:
    poller = make("gcp", metadata)
    metadata.gcp_preempt()
    before = time.time()
    notice = poller.check()
    after = time.time()
    assert notice is not None
    assert (notice.cloud, notice.action) == ("gcp", "preempted")
    # GCP gives no time: the VM stops about 30 s after the notice.
    assert notice.deadline is not None
    assert before + 30 - 1 <= notice.deadline <= after + 30 + 1


def test_gcp_watch_wakes_on_preemption_while_waiting(
    metadata: MetadataServer, watch: Callable[[Poller], Watching]
) -> None:
    """watch() hangs in wait_for_change; preemption answers that request at
    once, not after its timeout_sec."""
    w = watch(make("gcp", metadata, interval=3600))
    assert metadata.wait_gcp_waiting(HANG), "watch() never started a wait_for_change request"
    metadata.gcp_preempt()
    notice = w.wait_notice()
    assert (notice.cloud, notice.action) == ("gcp", "preempted")
    assert w.returned()
    waits = [r for r in metadata.requests if "wait_for_change=true" in r.path]
    assert waits, metadata.requests
    assert f"last_etag={metadata.gcp_etag('FALSE')}" in waits[0].path
    assert all(r.headers["metadata-flavor"] == "Google" for r in metadata.requests)
    assert len(w.notices) == 1


def test_gcp_watch_already_preempted(
    metadata: MetadataServer, watch: Callable[[Poller], Watching]
) -> None:
    metadata.gcp_preempt()
    w = watch(make("gcp", metadata, interval=3600))
    assert w.wait_notice().action == "preempted"
    assert w.returned()


# ------------------------------------------------------------------ Azure


def test_azure_no_notice_sends_metadata_true(metadata: MetadataServer) -> None:
    poller = make("azure", metadata)
    assert poller.check() is None
    reqs = metadata.requests
    assert reqs
    assert all(r.headers.get("metadata") == "true" for r in reqs), reqs
    assert all("x-forwarded-for" not in r.headers for r in reqs)
    events = [r for r in reqs if r.path.startswith(AZURE_EVENTS_PATH)]
    assert events
    assert all("api-version=" in r.path for r in events)
    names = [r for r in reqs if r.path.startswith(AZURE_NAME_PATH)]
    assert all("format=text" in r.path and "api-version=" in r.path for r in names)


@pytest.mark.parametrize("event_type", ["Preempt", "Terminate"])
def test_azure_notice(metadata: MetadataServer, event_type: str) -> None:
    poller = make("azure", metadata)
    before = time.time()
    metadata.azure_schedule(event_type, in_seconds=30)
    notice = poller.check()
    assert notice is not None
    assert (notice.cloud, notice.action) == ("azure", event_type)
    assert notice.deadline is not None
    assert abs(notice.deadline - (before + 30)) <= 1.0


@pytest.mark.parametrize("event_type", ["Reboot", "Redeploy", "Freeze"])
def test_azure_ignores_maintenance_events(metadata: MetadataServer, event_type: str) -> None:
    poller = make("azure", metadata)
    metadata.azure_schedule(event_type, in_seconds=600)
    assert poller.check() is None


def test_azure_ignores_events_for_other_vms(metadata: MetadataServer) -> None:
    poller = make("azure", metadata)
    metadata.azure_schedule("Preempt", 30, resources=["another-vm", "yet-another-vm"])
    metadata.azure_schedule("Terminate", 300, resources=["another-vm"])
    assert poller.check() is None
    metadata.azure_schedule("Preempt", 30, resources=["another-vm", metadata.vm_name])
    notice = poller.check()
    assert notice is not None
    assert notice.action == "Preempt"


def test_azure_uses_this_vms_name(metadata: MetadataServer) -> None:
    metadata.vm_name = "train-node-7"
    poller = make("azure", metadata)
    metadata.azure_schedule("Preempt", 30, resources=["ckpt-test-vm"])
    assert poller.check() is None
    metadata.azure_schedule("Preempt", 30)  # default resources: [vm_name]
    notice = poller.check()
    assert notice is not None
    assert notice.cloud == "azure"


def test_azure_started_event_has_no_deadline(metadata: MetadataServer) -> None:
    """NotBefore is blank once an event has Started: a notice, with no deadline."""
    poller = make("azure", metadata)
    metadata.azure_schedule("Preempt", 30, status="Started")
    notice = poller.check()
    assert notice is not None
    assert notice.action == "Preempt"
    assert notice.deadline is None


# ------------------------------------------------------------------ every cloud


@pytest.mark.parametrize("cloud", CLOUDS)
def test_watch_reports_the_notice_once(
    metadata: MetadataServer, watch: Callable[[Poller], Watching], cloud: str
) -> None:
    w = watch(make(cloud, metadata))
    action, deadline = schedule(metadata, cloud)
    notice = w.wait_notice()
    assert (notice.cloud, notice.action) == (cloud, action)
    assert notice.deadline is not None and deadline is not None
    assert abs(notice.deadline - deadline) <= 2.0
    assert w.returned()
    assert len(w.notices) == 1
    assert w.errors == []


@pytest.mark.parametrize(
    ("cloud", "status"),
    [("aws", 500), ("aws", 503), ("gcp", 503), ("gcp", 500), ("azure", 500), ("azure", 410)],
)
def test_watch_reports_errors_and_keeps_polling(
    metadata: MetadataServer, watch: Callable[[Poller], Watching], cloud: str, status: int
) -> None:
    metadata.fail_next(3, status=status)
    action, _ = schedule(metadata, cloud)
    w = watch(make(cloud, metadata))
    notice = w.wait_notice()
    assert notice.action == action
    assert w.errors, "the failed requests were not reported"
    assert any(str(status) in e for e in w.errors), w.errors
    assert w.returned()


@pytest.mark.parametrize("cloud", CLOUDS)
def test_watch_reports_an_unreachable_service(
    watch: Callable[[Poller], Watching], cloud: str
) -> None:
    """Nothing listening (connection refused): errors, no notice, and stop
    still ends the watch. The port is held, bound but not listening, so no
    other server can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        poller = poller_for(cloud, base_url=url, interval=FAST)
        assert poller is not None
        w = watch(poller)
        deadline = time.monotonic() + HANG
        while not w.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.errors
        assert cloud in w.errors[0]
        w.stop.set()
        assert w.returned()
        assert w.notices == []


@pytest.mark.parametrize("cloud", CLOUDS)
def test_watch_returns_when_stop_is_set(
    metadata: MetadataServer, watch: Callable[[Poller], Watching], cloud: str
) -> None:
    w = watch(make(cloud, metadata, interval=FAST))
    if cloud == "gcp":  # stop while a wait_for_change request hangs
        assert metadata.wait_gcp_waiting(HANG)
    else:  # stop between polls
        deadline = time.monotonic() + HANG
        while len(metadata.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    w.stop.set()
    assert w.returned(), f"{cloud} watch() still running {HANG}s after stop was set"
    assert w.notices == []
    assert w.errors == []


@pytest.mark.parametrize("cloud", CLOUDS)
def test_stalled_service_is_an_error(metadata: MetadataServer, cloud: str) -> None:
    poller = make(cloud, metadata)
    poller.timeout = 0.2  # the stall outlasts it; the fixture releases the stall at teardown
    metadata.stall(HANG)
    with pytest.raises(MetadataError):
        poller.check()


@pytest.mark.parametrize("mode", ["close", "truncate", "garbage"])
@pytest.mark.parametrize("cloud", CLOUDS)
def test_broken_answer_is_a_metadata_error(metadata: MetadataServer, cloud: str, mode: str) -> None:
    """A connection closed early, a truncated body, a non-HTTP answer: each is
    a MetadataError (a transport error), never another exception."""
    poller = make(cloud, metadata)
    metadata.break_next(1, mode)
    with pytest.raises(MetadataError):
        poller.check()
    assert poller.check() is None  # and the next poll works


@pytest.mark.parametrize("cloud", CLOUDS)
def test_watch_survives_a_broken_answer(
    metadata: MetadataServer, watch: Callable[[Poller], Watching], cloud: str
) -> None:
    metadata.break_next(1, "garbage")
    action, _ = schedule(metadata, cloud)
    w = watch(make(cloud, metadata))
    assert w.wait_notice().action == action
    assert w.errors


# ------------------------------------------------------------------ detect()

DMI: dict[str, dict[str, str]] = {
    # Nitro instances name themselves; board_asset_tag holds the instance id.
    "aws-nitro": {
        "sys_vendor": "Amazon EC2",
        "product_name": "m5.large",
        "bios_vendor": "Amazon EC2",
        "board_vendor": "Amazon EC2",
        "chassis_asset_tag": "Amazon EC2",
        "board_asset_tag": "i-0123456789abcdef0",
    },
    # Older Xen instances: only the BIOS version (and the uuid) say Amazon.
    "aws-xen": {
        "sys_vendor": "Xen",
        "product_name": "HVM domU",
        "bios_vendor": "Xen",
        "bios_version": "4.2.amazon",
        "product_uuid": "EC2CEFAC-DCE1-EED5-4E48-83AD3EF51BFB",
    },
    "gcp": {
        "sys_vendor": "Google",
        "product_name": "Google Compute Engine",
        "bios_vendor": "Google",
        "board_vendor": "Google",
        "board_name": "Google Compute Engine",
    },
    "azure": {
        "sys_vendor": "Microsoft Corporation",
        "product_name": "Virtual Machine",
        "bios_vendor": "Microsoft Corporation",
        "board_vendor": "Microsoft Corporation",
        "chassis_asset_tag": AZURE_TAG,
    },
    # Hyper-V outside Azure: same vendor and product, another asset tag.
    "hyper-v": {
        "sys_vendor": "Microsoft Corporation",
        "product_name": "Virtual Machine",
        "bios_vendor": "Microsoft Corporation",
        "board_vendor": "Microsoft Corporation",
        "chassis_asset_tag": "0000-0000-0000-0000-0000-0000-00",
    },
    "kvm": {
        "sys_vendor": "QEMU",
        "product_name": "Standard PC (Q35 + ICH9, 2009)",
        "bios_vendor": "SeaBIOS",
        "chassis_asset_tag": "",
    },
    "laptop": {
        "sys_vendor": "LENOVO",
        "product_name": "20XW0055GE",
        "bios_vendor": "LENOVO",
        "board_vendor": "LENOVO",
        "chassis_asset_tag": "No Asset Information",
    },
}
EXPECTED = {
    "aws-nitro": "aws",
    "aws-xen": "aws",
    "gcp": "gcp",
    "azure": "azure",
    "hyper-v": None,
    "kvm": None,
    "laptop": None,
}


def dmi_dir(tmp_path: Path, machine: str) -> Path:
    d = tmp_path / "dmi" / machine
    d.mkdir(parents=True)
    for name, value in DMI[machine].items():
        (d / name).write_text(value + "\n")  # sysfs values end with a newline
    return d


@pytest.mark.parametrize("machine", sorted(DMI))
def test_detect(tmp_path: Path, machine: str) -> None:
    assert detect(dmi_dir(tmp_path, machine)) == EXPECTED[machine]


def test_detect_without_dmi(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect(empty) is None
    assert detect(tmp_path / "missing") is None


# ------------------------------------------------------------------ poller_for()


def test_poller_for_off_and_bogus(metadata: MetadataServer) -> None:
    assert poller_for("off", base_url=metadata.url) is None
    with pytest.raises(ConfigError):
        poller_for("bogus")
    with pytest.raises(ConfigError):
        poller_for("", base_url=metadata.url)
    assert metadata.requests == []


def test_auto_off_a_cloud_sends_nothing(
    tmp_path: Path, metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off a cloud, auto is None even with the URL override set: nothing is
    ever sent anywhere."""
    monkeypatch.setenv(ENV_METADATA_URL, metadata.url)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert poller_for("auto", dmi_dir=empty) is None
    assert poller_for("auto", dmi_dir=dmi_dir(tmp_path, "laptop")) is None
    assert poller_for("auto", dmi_dir=dmi_dir(tmp_path, "hyper-v")) is None
    assert metadata.requests == []


@pytest.mark.parametrize(
    ("machine", "cloud"), [("aws-nitro", "aws"), ("gcp", "gcp"), ("azure", "azure")]
)
def test_auto_on_a_cloud(
    tmp_path: Path, metadata: MetadataServer, machine: str, cloud: str
) -> None:
    poller = poller_for("auto", base_url=metadata.url, dmi_dir=dmi_dir(tmp_path, machine))
    assert poller is not None
    assert poller.cloud == cloud
    assert poller.check() is None
    assert metadata.requests


@pytest.mark.parametrize("cloud", CLOUDS)
def test_url_from_the_environment(
    metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch, cloud: str
) -> None:
    monkeypatch.setenv(ENV_METADATA_URL, metadata.url)
    poller = poller_for(cloud)
    assert poller is not None
    assert poller.base_url == metadata.url
    action, _ = schedule(metadata, cloud)
    notice = poller.check()
    assert notice is not None
    assert notice.action == action
    assert metadata.requests


@pytest.mark.parametrize("cloud", CLOUDS)
def test_base_url_beats_the_environment(
    metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch, cloud: str
) -> None:
    monkeypatch.setenv(ENV_METADATA_URL, "http://127.0.0.1:9")  # never used
    poller = poller_for(cloud, base_url=metadata.url + "/")
    assert poller is not None
    assert poller.base_url == metadata.url
    assert poller.check() is None
    assert metadata.requests


@pytest.mark.parametrize("url", ["169.254.169.254", "https://127.0.0.1:1", "http://", "ftp://x"])
def test_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        poller_for("aws", base_url=url)


@pytest.mark.parametrize(
    ("cloud", "url"),
    [
        ("aws", "http://169.254.169.254"),
        ("gcp", "http://metadata.google.internal"),
        ("azure", "http://169.254.169.254"),
    ],
)
def test_default_urls_are_the_real_metadata_addresses(cloud: str, url: str) -> None:
    """Strings only: these pollers are built, never polled."""
    poller = poller_for(cloud)
    assert poller is not None
    assert poller.base_url == url


# ------------------------------------------------------------------ the fake itself
# The fakes follow the documented semantics (see tests/metadata.py); if these
# drift, the poller tests above stop meaning anything.


def test_fake_aws_imdsv2(metadata: MetadataServer) -> None:
    u = metadata.url
    ttl = "X-aws-ec2-metadata-token-ttl-seconds"
    assert http(u + AWS_ACTION_PATH)[0] == 401  # IMDSv2 required: no token
    assert http(u + AWS_ACTION_PATH, headers={"X-aws-ec2-metadata-token": "x"})[0] == 401
    assert http(u + AWS_TOKEN_PATH, "PUT")[0] == 400
    assert http(u + AWS_TOKEN_PATH, "PUT", {ttl: "0"})[0] == 400
    assert http(u + AWS_TOKEN_PATH, "PUT", {ttl: "21601"})[0] == 400
    assert http(u + AWS_TOKEN_PATH, "PUT", {ttl: "60", "X-Forwarded-For": "10.0.0.1"})[0] == 403
    assert http(u + "/2021-03-23/api/token", "PUT", {ttl: "60"})[0] == 403
    status, token, headers = http(u + AWS_TOKEN_PATH, "PUT", {ttl: "21600"})
    assert status == 200
    assert headers[ttl] == "21600"
    auth = {"X-aws-ec2-metadata-token": token.decode()}
    assert http(u + AWS_ACTION_PATH, headers=auth)[0] == 404
    metadata.aws_schedule("hibernate", 0)
    status, body, headers = http(u + AWS_ACTION_PATH, headers=auth)
    assert status == 200
    assert headers["Content-Type"] == "text/plain"
    doc = json.loads(body)
    assert doc["action"] == "hibernate"
    assert time.strptime(doc["time"], "%Y-%m-%dT%H:%M:%SZ")
    metadata.aws_expire_tokens()
    assert http(u + AWS_ACTION_PATH, headers=auth)[0] == 401


def test_fake_gcp(metadata: MetadataServer) -> None:
    u = metadata.url + GCP_PREEMPTED_PATH
    flavor = {"Metadata-Flavor": "Google"}
    assert http(u)[0] == 403
    assert http(u, headers={**flavor, "X-Forwarded-For": "10.0.0.1"})[0] == 403
    status, body, headers = http(u, headers=flavor)
    assert (status, body) == (200, b"FALSE")
    assert headers["ETag"] == metadata.gcp_etag("FALSE")
    assert headers["Metadata-Flavor"] == "Google"
    # A wait with a stale ETag answers at once; a wait that times out answers
    # the unchanged value.
    assert http(u + "?wait_for_change=true&last_etag=stale", headers=flavor)[1] == b"FALSE"
    assert http(u + "?wait_for_change=true&timeout_sec=1", headers=flavor)[1] == b"FALSE"
    assert http(u + "?wait_for_change=true&timeout_sec=x", headers=flavor)[0] == 400
    metadata.gcp_preempt()
    status, body, headers = http(u, headers=flavor)
    assert (status, body) == (200, b"TRUE")
    assert headers["ETag"] == metadata.gcp_etag("TRUE") != metadata.gcp_etag("FALSE")


def test_fake_gcp_stop_releases_a_hanging_wait() -> None:
    answers: list[int] = []
    with running() as server:
        url = server.url + GCP_PREEMPTED_PATH + "?wait_for_change=true"  # no timeout_sec
        t = threading.Thread(
            target=lambda: answers.append(http(url, headers={"Metadata-Flavor": "Google"})[0]),
            daemon=True,
        )
        t.start()
        assert server.wait_gcp_waiting(HANG)
    t.join(HANG)
    assert not t.is_alive()
    assert answers == [503]


def test_fake_azure(metadata: MetadataServer) -> None:
    events = metadata.url + AZURE_EVENTS_PATH
    name = metadata.url + AZURE_NAME_PATH
    md = {"Metadata": "true"}
    assert http(events + "?api-version=2020-07-01")[0] == 400  # no Metadata header
    assert (
        http(events + "?api-version=2020-07-01", headers={**md, "X-Forwarded-For": "x"})[0] == 400
    )
    status, body, _ = http(events, headers=md)
    assert status == 400
    assert "api-version" in json.loads(body)["error"]
    assert http(events + "?api-version=2020-07-01&api-version=2020-07-01", headers=md)[0] == 400
    assert http(name + "?api-version=2021-02-01", headers=md)[0] == 400  # leaf: format=text
    status, body, _ = http(name + "?api-version=2021-02-01&format=text", headers=md)
    assert (status, body) == (200, b"ckpt-test-vm")

    status, body, _ = http(events + "?api-version=2020-07-01", headers=md)
    assert status == 200
    empty = json.loads(body)
    assert empty["Events"] == []
    event_id = metadata.azure_schedule("Preempt", 30)
    doc = json.loads(http(events + "?api-version=2020-07-01", headers=md)[1])
    assert doc["DocumentIncarnation"] > empty["DocumentIncarnation"]
    (ev,) = doc["Events"]
    assert ev["EventId"] == event_id
    assert ev["EventType"] == "Preempt"
    assert ev["ResourceType"] == "VirtualMachine"
    assert ev["Resources"] == ["ckpt-test-vm"]
    assert ev["EventStatus"] == "Scheduled"
    assert ev["NotBefore"].endswith(" GMT")
    assert {"Description", "EventSource", "DurationInSeconds"} <= set(ev)
    old = json.loads(http(events + "?api-version=2019-01-01", headers=md)[1])["Events"][0]
    assert not {"Description", "EventSource", "DurationInSeconds"} & set(old)

    start = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
    assert http(events + "?api-version=2020-07-01", "POST", md, start)[0] == 200
    (ev,) = json.loads(http(events + "?api-version=2020-07-01", headers=md)[1])["Events"]
    assert (ev["EventStatus"], ev["NotBefore"]) == ("Started", "")


def test_fake_records_and_resets(metadata: MetadataServer) -> None:
    metadata.fail_next(1, status=429)
    assert http(metadata.url + GCP_PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"})[0] == 429
    assert http(metadata.url + GCP_PREEMPTED_PATH, headers={"Metadata-Flavor": "Google"})[0] == 200
    (first, _) = metadata.requests
    assert first.method == "GET"
    assert first.headers["metadata-flavor"] == "Google"
    metadata.gcp_preempt()
    metadata.aws_schedule()
    metadata.azure_schedule()
    metadata.reset()
    assert metadata.requests == []
    for cloud in CLOUDS:
        assert make(cloud, metadata).check() is None


# ------------------------------------------------------------------ hibernation, first poll


def test_aws_hibernation_is_reported_once_and_watching_goes_on(
    metadata: MetadataServer, watch: Callable[[Poller], Watching]
) -> None:
    """A hibernation is not final (the job is frozen with the instance, not
    lost): watch() reports it once and keeps polling, so a later terminate
    still arrives."""
    w = watch(make("aws", metadata))
    metadata.aws_schedule("hibernate", in_seconds=60)
    first = w.wait_notice()
    assert (first.action, first.final) == ("hibernate", False)
    polls = len(metadata.requests)
    deadline = time.monotonic() + HANG
    while len(metadata.requests) < polls + 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(w.notices) == 1, "the same hibernation notice must be reported once"
    assert w.thread is not None and w.thread.is_alive()
    metadata.aws_schedule("terminate", in_seconds=60)
    assert w.returned()
    assert [n.action for n in w.notices] == ["hibernate", "terminate"]
    assert w.notices[-1].final


@pytest.mark.parametrize("fail", [False, True], ids=["answered", "failed"])
def test_watch_sets_polled_after_the_first_poll(metadata: MetadataServer, fail: bool) -> None:
    if fail:
        metadata.fail_next(1000, status=500)
    poller = make("aws", metadata)
    stop, polled = threading.Event(), threading.Event()
    t = threading.Thread(
        target=poller.watch, args=(stop, lambda n: None, lambda e: None, polled), daemon=True
    )
    t.start()
    try:
        assert polled.wait(HANG), "polled must be set once the first poll answered or failed"
    finally:
        stop.set()
        t.join(HANG)
