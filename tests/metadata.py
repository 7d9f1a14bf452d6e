"""Fake cloud metadata services on 127.0.0.1, for the preemption pollers' tests.

One `ThreadingHTTPServer` bound to 127.0.0.1 on a free port serves the three
APIs ckpt polls, each with the semantics its documentation gives (request
paths, required headers, status codes, body formats). Point a poller at
`server.url` (the `base_url` argument, or CKPT_METADATA_URL): nothing here ever
listens on, or talks to, a non-loopback address.

AWS, IMDSv2 (tokens required, as on an instance with HttpTokens=required):
    PUT /latest/api/token
        needs X-aws-ec2-metadata-token-ttl-seconds: 1..21600, else 400; a PUT
        carrying X-Forwarded-For, or a PUT to any other path (for example a
        version-specific /2021-03-23/api/token), is 403. Answers a random token
        (text/plain) and echoes the TTL in the same header.
    GET /latest/meta-data/spot/instance-action
        needs X-aws-ec2-metadata-token with a live token: none, unknown or
        expired -> 401. 404 until `aws_schedule()`, then 200 with
        {"action": "terminate"|"stop"|"hibernate", "time": "YYYY-MM-DDTHH:MM:SSZ"}
        (JSON served as text/plain, like every IMDS item).
    GET /latest/meta-data/spot/termination-time (the legacy item): 404, then
        the same time alone (for terminate only).
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html

GCP, the Compute Engine metadata server:
    GET /computeMetadata/v1/instance/preempted
        needs Metadata-Flavor: Google, else 403; a request carrying
        X-Forwarded-For is 403. Answers FALSE, or TRUE after `gcp_preempt()`
        (Content-Type application/text, with an ETag: a hash of the value, so
        equal values have equal ETags, and the Metadata-Flavor: Google header).
        ?wait_for_change=true hangs until the value changes, or timeout_sec
        elapses, then answers the current value; with last_etag=E it answers
        at once if the current ETag differs from E. A bad timeout_sec is 400.
    https://cloud.google.com/compute/docs/metadata/querying-metadata
    https://cloud.google.com/compute/docs/instances/spot (preemption process)
    https://cloud.google.com/compute/docs/troubleshooting/troubleshoot-metadata-server

Azure, the Instance Metadata Service (IMDS):
    every /metadata request needs `Metadata: true` and must not carry
    X-Forwarded-For (400 otherwise), needs a known api-version (400 with the
    documented error JSON otherwise), and may not repeat a query parameter (400).
    GET /metadata/scheduledevents?api-version=2020-07-01
        {"DocumentIncarnation": N, "Events": [...]} (N grows with every change);
        each event has EventId, EventType (Preempt, Reboot, Redeploy, Freeze,
        Terminate), ResourceType "VirtualMachine", Resources (VM names),
        EventStatus (Scheduled or Started), NotBefore (an RFC 1123 date like
        "Mon, 19 Sep 2016 18:29:47 GMT"; blank once Started), and, by
        api-version, Description (2019-04-01), EventSource (2019-08-01) and
        DurationInSeconds (2020-07-01).
    POST /metadata/scheduledevents {"StartRequests": [{"EventId": ...}]}
        approves events: they become Started.
    GET /metadata/instance/compute/name?api-version=2021-02-01&format=text
        the VM's name (a leaf node: format=text is required, else 400).
    https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events
    https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service

Control API (the `metadata` fixture is a `MetadataServer`; every method is
thread-safe):
    url                             "http://127.0.0.1:PORT"
    requests                        recorded `Request(method, path, headers)`:
                                    path with its query string, header names
                                    lower-cased (HTTP names are case-insensitive)
    aws_schedule(action, in_seconds) -> the epoch time scheduled
    aws_expire_tokens()             every issued token stops working (401)
    aws_tokens                      the tokens issued so far
    gcp_preempt()                   instance/preempted becomes TRUE; hanging
                                    wait_for_change requests answer at once
    gcp_etag(value)                 the ETag the server gives that value
    wait_gcp_waiting(timeout)       True once a wait_for_change request hangs
    azure_schedule(event_type, in_seconds, resources, status, ...) -> EventId
    vm_name                         Azure's compute/name (default "ckpt-test-vm")
    fail_next(n, status=500)        the next n requests answer `status`
    break_next(n, mode)             the next n requests get a broken answer:
                                    "close" (no answer), "truncate" (a body
                                    shorter than its Content-Length), "garbage"
                                    (no valid HTTP status line)
    stall(seconds)                  delay every answer (0: stop delaying)
    reset()                         no notices, no faults, no tokens, no records

The `metadata` fixture starts one server per test and stops it afterwards
(shutdown + server_close); stopping first releases every hanging GCP wait and
every stalled answer, so it never blocks.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import json
import secrets
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

import pytest

HOST = "127.0.0.1"
DEFAULT_VM_NAME = "ckpt-test-vm"

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TERMINATION_PATH = "/latest/meta-data/spot/termination-time"
AWS_MAX_TTL = 21600
AWS_ACTIONS = ("terminate", "stop", "hibernate")

GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"

AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_NAME_PATH = "/metadata/instance/compute/name"
AZURE_EVENT_TYPES = ("Preempt", "Reboot", "Redeploy", "Freeze", "Terminate")
#: Scheduled Events versions (release notes in the scheduled-events page).
AZURE_EVENTS_VERSIONS = (
    "2017-03-01",
    "2017-08-01",
    "2017-11-01",
    "2019-01-01",
    "2019-04-01",
    "2019-08-01",
    "2020-07-01",
)
#: Instance metadata versions (the "Supported API versions" list).
AZURE_INSTANCE_VERSIONS = (
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
)
BREAK_MODES = ("close", "truncate", "garbage")


class Request(NamedTuple):
    """One request as the server saw it (recorded on arrival)."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased


@dataclass
class _AzureEvent:
    event_id: str
    event_type: str
    resources: list[str]
    status: str
    not_before: float
    description: str
    source: str
    duration: int

    def document(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "EventId": self.event_id,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(self.resources),
            "EventStatus": self.status,
            "NotBefore": (
                ""
                if self.status == "Started"
                else email.utils.formatdate(self.not_before, usegmt=True)
            ),
        }
        if version >= "2019-04-01":
            doc["Description"] = self.description
        if version >= "2019-08-01":
            doc["EventSource"] = self.source
        if version >= "2020-07-01":
            doc["DurationInSeconds"] = self.duration
        return doc


@dataclass
class _State:
    """Everything the control API changes; guarded by MetadataServer._cond."""

    vm_name: str = DEFAULT_VM_NAME
    requests: list[Request] = field(default_factory=list)
    # faults
    fail_count: int = 0
    fail_status: int = 500
    break_count: int = 0
    break_mode: str = "close"
    stall: float = 0.0
    # aws
    aws_tokens: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    aws_issued: list[str] = field(default_factory=list)
    aws_action: tuple[str, float] | None = None
    # gcp
    gcp_preempted: bool = False
    gcp_waiting: int = 0
    # azure
    azure_incarnation: int = 1
    azure_events: list[_AzureEvent] = field(default_factory=list)


def _etag(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _gcp_value(preempted: bool) -> str:
    return "TRUE" if preempted else "FALSE"


class MetadataServer:
    """The three fake metadata services behind one HTTP server on 127.0.0.1."""

    def __init__(self, *, vm_name: str = DEFAULT_VM_NAME) -> None:
        self._cond = threading.Condition()
        self._state = _State(vm_name=vm_name)
        self._closing = False
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        handler = _make_handler(self)
        httpd = _HTTPServer((HOST, 0), handler)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # hanging GCP waits and stalls answer now
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    # ------------------------------------------------------------ control API

    @property
    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._state.requests)

    @property
    def vm_name(self) -> str:
        with self._cond:
            return self._state.vm_name

    @vm_name.setter
    def vm_name(self, name: str) -> None:
        with self._cond:
            self._state.vm_name = name

    @property
    def aws_tokens(self) -> list[str]:
        with self._cond:
            return list(self._state.aws_issued)

    def aws_schedule(self, action: str = "terminate", in_seconds: float = 120) -> float:
        """Mark the instance for interruption; returns the epoch time given."""
        if action not in AWS_ACTIONS:
            raise ValueError(f"AWS spot actions are {AWS_ACTIONS}, not {action!r}")
        when = time.time() + in_seconds
        with self._cond:
            self._state.aws_action = (action, when)
        return when

    def aws_expire_tokens(self) -> None:
        with self._cond:
            self._state.aws_tokens.clear()

    def gcp_preempt(self) -> None:
        with self._cond:
            self._state.gcp_preempted = True
            self._cond.notify_all()

    @staticmethod
    def gcp_etag(value: str) -> str:
        return _etag(value)

    def wait_gcp_waiting(self, timeout: float) -> bool:
        """True once some wait_for_change request is hanging (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state.gcp_waiting > 0, timeout)

    def azure_schedule(
        self,
        event_type: str = "Preempt",
        in_seconds: float = 30,
        resources: list[str] | None = None,
        *,
        status: str = "Scheduled",
        description: str = "",
        source: str = "Platform",
        duration: int = -1,
    ) -> str:
        """Add a scheduled event (default resources: this VM); returns its EventId."""
        if event_type not in AZURE_EVENT_TYPES:
            raise ValueError(f"Azure event types are {AZURE_EVENT_TYPES}, not {event_type!r}")
        if status not in ("Scheduled", "Started"):
            raise ValueError(f"EventStatus is Scheduled or Started, not {status!r}")
        event_id = str(uuid.uuid4()).upper()
        with self._cond:
            self._state.azure_events.append(
                _AzureEvent(
                    event_id=event_id,
                    event_type=event_type,
                    resources=(list(resources) if resources is not None else [self._state.vm_name]),
                    status=status,
                    not_before=time.time() + in_seconds,
                    description=description,
                    source=source,
                    duration=duration,
                )
            )
            self._state.azure_incarnation += 1
        return event_id

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._cond:
            self._state.fail_count = n
            self._state.fail_status = status

    def break_next(self, n: int, mode: str = "close") -> None:
        if mode not in BREAK_MODES:
            raise ValueError(f"break modes are {BREAK_MODES}, not {mode!r}")
        with self._cond:
            self._state.break_count = n
            self._state.break_mode = mode

    def stall(self, seconds: float) -> None:
        with self._cond:
            self._state.stall = seconds
            self._cond.notify_all()  # answers waiting on the old stall re-check

    def reset(self) -> None:
        with self._cond:
            vm_name = self._state.vm_name
            incarnation = self._state.azure_incarnation
            self._state = _State(vm_name=vm_name, azure_incarnation=incarnation + 1)
            self._cond.notify_all()

    # ------------------------------------------------------------ request handling

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Answer:
        arrival = time.monotonic()
        with self._cond:
            self._state.requests.append(Request(method, target, headers))
            while not self._closing:  # stall(): re-read, so stall(0) releases at once
                remaining = arrival + self._state.stall - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closing:
                return _text(503, "shutting down")
            if self._state.break_count > 0:
                self._state.break_count -= 1
                return _Answer(0, b"", {}, broken=self._state.break_mode)
            if self._state.fail_count > 0:
                self._state.fail_count -= 1
                return _text(self._state.fail_status, "injected failure")
        url = urlsplit(target)
        path = url.path
        query = parse_qsl(url.query, keep_blank_values=True)
        if path.startswith("/computeMetadata/"):
            return self._gcp(method, path, query, headers)
        if path.startswith("/metadata/"):
            return self._azure(method, path, query, headers, body)
        if method == "PUT" or path.startswith("/latest/"):
            return self._aws(method, path, headers)
        return _text(404, "Not Found")

    # AWS ------------------------------------------------------------------

    def _aws(self, method: str, path: str, headers: dict[str, str]) -> _Answer:
        if method == "PUT":
            if path != AWS_TOKEN_PATH or "x-forwarded-for" in headers:
                return _text(403, "Forbidden")
            raw = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            try:
                ttl = int(raw)
            except ValueError:
                ttl = 0
            if not 1 <= ttl <= AWS_MAX_TTL:
                return _text(400, "Missing or Invalid Parameters")
            token = secrets.token_urlsafe(42)
            with self._cond:
                self._state.aws_tokens[token] = time.monotonic() + ttl
                self._state.aws_issued.append(token)
            return _text(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
        if method != "GET":
            return _text(405, "Method Not Allowed")
        token = headers.get("x-aws-ec2-metadata-token")
        with self._cond:
            expiry = self._state.aws_tokens.get(token or "")
            if expiry is None or expiry <= time.monotonic():
                return _text(401, "Unauthorized")
            action = self._state.aws_action
        if path == AWS_ACTION_PATH and action is not None:
            kind, when = action
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
            return _text(200, json.dumps({"action": kind, "time": stamp}))
        if path == AWS_TERMINATION_PATH and action is not None and action[0] == "terminate":
            return _text(200, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(action[1])))
        return _text(404, "Not Found")

    # GCP ------------------------------------------------------------------

    def _gcp(
        self, method: str, path: str, query: list[tuple[str, str]], headers: dict[str, str]
    ) -> _Answer:
        if headers.get("metadata-flavor") != "Google" or "x-forwarded-for" in headers:
            return _text(403, "Forbidden", {"Content-Type": "text/html; charset=UTF-8"})
        if method != "GET":
            return _text(405, "Method Not Allowed")
        if path != GCP_PREEMPTED_PATH:
            return _text(404, "Not Found")
        params = dict(query)
        wait = params.get("wait_for_change", "false").lower() == "true"
        timeout: float | None = None
        if "timeout_sec" in params:
            try:
                timeout = float(int(params["timeout_sec"]))
            except ValueError:
                return _text(400, "Bad Request: invalid timeout_sec")
            if timeout <= 0:
                return _text(400, "Bad Request: invalid timeout_sec")
        with self._cond:
            value = _gcp_value(self._state.gcp_preempted)
            if wait:
                since = params.get("last_etag") or _etag(value)
                if since == _etag(value):
                    self._state.gcp_waiting += 1
                    self._cond.notify_all()
                    try:
                        self._cond.wait_for(
                            lambda: (
                                self._closing
                                or _etag(_gcp_value(self._state.gcp_preempted)) != since
                            ),
                            timeout,
                        )
                    finally:
                        self._state.gcp_waiting -= 1
                    if self._closing:
                        return _text(503, "shutting down")
                value = _gcp_value(self._state.gcp_preempted)
        return _text(
            200,
            value,
            {"Content-Type": "application/text", "ETag": _etag(value), "Metadata-Flavor": "Google"},
        )

    # Azure ----------------------------------------------------------------

    def _azure(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes,
    ) -> _Answer:
        if headers.get("metadata", "").lower() != "true" or "x-forwarded-for" in headers:
            return _json(400, {"error": "Bad request. Required metadata header not specified"})
        names = [name for name, _ in query]
        if len(names) != len(set(names)):
            return _json(400, {"error": "Bad request. Duplicate query parameters"})
        params = dict(query)
        versions = AZURE_EVENTS_VERSIONS if path == AZURE_EVENTS_PATH else AZURE_INSTANCE_VERSIONS
        version = params.get("api-version")
        if version not in versions:
            what = "was not specified" if version is None else "is invalid"
            return _json(
                400,
                {
                    "error": f"Bad request. api-version {what} in the request. "
                    "For more information refer to aka.ms/azureimds",
                    "newest-versions": sorted(versions, reverse=True)[:3],
                },
            )
        if path == AZURE_EVENTS_PATH:
            if method == "GET":
                with self._cond:
                    doc = {
                        "DocumentIncarnation": self._state.azure_incarnation,
                        "Events": [ev.document(version) for ev in self._state.azure_events],
                    }
                return _json(200, doc)
            if method == "POST":
                return self._azure_start(body)
            return _json(405, {"error": "Method not allowed"})
        if method != "GET":
            return _json(405, {"error": "Method not allowed"})
        if path == AZURE_NAME_PATH:
            if params.get("format") != "text":
                return _json(400, {"error": "Bad request. Leaf nodes need format=text"})
            return _text(200, self.vm_name)
        return _json(404, {"error": "Not found"})

    def _azure_start(self, body: bytes) -> _Answer:
        try:
            wanted = {str(r["EventId"]) for r in json.loads(body)["StartRequests"]}
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": "Bad request. Invalid StartRequests document"})
        with self._cond:
            for ev in self._state.azure_events:
                if ev.event_id in wanted:
                    ev.status = "Started"
            self._state.azure_incarnation += 1
        return _text(200, "")


@dataclass
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    broken: str = ""  # a BREAK_MODES entry: answer that way instead


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(status, text.encode(), {"Content-Type": "text/plain", **(headers or {})})


def _json(status: int, doc: dict[str, Any]) -> _Answer:
    return _Answer(
        status, json.dumps(doc).encode(), {"Content-Type": "application/json; charset=utf-8"}
    )


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(host): a reverse lookup
        # that may leave the machine. The name is not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def _make_handler(server: MetadataServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ckpt-fake-metadata"

        def version_string(self) -> str:
            return self.server_version

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            answer = server._handle(self.command, self.path, headers, body)
            self.close_connection = True
            if answer.broken:
                self._broken(answer.broken)
                return
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)

        def _broken(self, mode: str) -> None:
            if mode == "truncate":
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"FALSE")
            elif mode == "garbage":
                self.wfile.write(b"this is not HTTP\r\n\r\n")
            # "close": nothing at all; the connection closes when the handler returns.
            with contextlib.suppress(OSError):
                self.wfile.flush()

        do_GET = _serve
        do_PUT = _serve
        do_POST = _serve
        do_HEAD = _serve
        do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the recorded requests are the log

    return Handler


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[MetadataServer]:
    """A started MetadataServer, stopped on exit (for use outside the fixture)."""
    server = MetadataServer(**kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="metadata")  # the name also when imported under another one
def metadata() -> Iterator[MetadataServer]:
    """The fake metadata services on 127.0.0.1 for one test."""
    with running() as server:
        yield server


__all__ = [
    "AWS_ACTION_PATH",
    "AWS_TOKEN_PATH",
    "AZURE_EVENTS_PATH",
    "AZURE_NAME_PATH",
    "GCP_PREEMPTED_PATH",
    "MetadataServer",
    "Request",
    "metadata",
    "running",
]
