"""Cloud preemption notices: which cloud this machine is on (from local files
only), and a poller per cloud that watches its metadata service for the
notice that the machine is about to be taken away.

`auto` decides from DMI data under /sys/class/dmi/id and sends nothing at all
unless that names AWS, Google Compute Engine or Azure: a laptop, a CI runner
or an on-premises server never sees a packet to a metadata address.
`CKPT_METADATA_URL` (or `base_url`) points every poller somewhere else: the
tests use fake metadata servers on 127.0.0.1.

  AWS    IMDSv2: PUT /latest/api/token, then GET
         /latest/meta-data/spot/instance-action with the token: 404 until an
         action is scheduled, then {"action", "time"} about two minutes ahead.
  GCP    GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google)
         with wait_for_change: TRUE about 30 s before the VM stops.
  Azure  GET /metadata/scheduledevents (Metadata: true): a "Preempt" (or
         "Terminate") event for this VM, NotBefore at least 30 s ahead.
"""

from __future__ import annotations

import abc
import calendar
import contextlib
import email.utils
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ckpt_cli.errors import CkptError, ConfigError

ENV_METADATA_URL = "CKPT_METADATA_URL"
#: Where the machine's DMI identity is read (a container that masks /sys, or a
#: test, points it elsewhere).
ENV_DMI_DIR = "CKPT_DMI_DIR"
DMI_DIR = Path("/sys/class/dmi/id")
MODES = ("auto", "aws", "gcp", "azure", "off")
DEFAULT_BASE = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
#: The chassis asset tag every Azure VM reports; Hyper-V elsewhere does not.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
#: GCP gives no time in its notice: the VM stops about 30 s after it.
GCP_WINDOW = 30.0


class MetadataError(CkptError):
    """The metadata service did not answer as documented."""


@dataclass(frozen=True)
class Notice:
    cloud: str  # "aws" | "gcp" | "azure"
    action: str  # aws: terminate/stop/hibernate; gcp: preempted; azure: the EventType
    deadline: float | None  # epoch seconds when the machine goes away, if known
    detail: str

    @property
    def final(self) -> bool:
        """The machine goes away. An AWS hibernation does not take the job: it
        is frozen with the instance's memory and goes on when it resumes."""
        return not (self.cloud == "aws" and self.action == "hibernate")

    def seconds_left(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)

    def describe(self) -> str:
        left = self.seconds_left()
        when = f", about {max(0.0, left):.0f}s left" if left is not None else ""
        return f"{self.cloud} {self.action}{when} ({self.detail})"


def _dmi(dmi_dir: Path, name: str) -> str:
    try:
        return (dmi_dir / name).read_text(errors="replace").strip()
    except OSError:
        return ""


def detect(dmi_dir: Path = DMI_DIR) -> str | None:
    """The cloud this machine runs on, from DMI files alone (no network)."""
    vendor = _dmi(dmi_dir, "sys_vendor")
    product = _dmi(dmi_dir, "product_name")
    bios = _dmi(dmi_dir, "bios_vendor")
    if "Amazon EC2" in (vendor, bios, _dmi(dmi_dir, "board_vendor")) or "amazon" in _dmi(
        dmi_dir, "bios_version"
    ):
        return "aws"
    if vendor == "Google" or product == "Google Compute Engine" or bios == "Google":
        return "gcp"
    if vendor == "Microsoft Corporation" and _dmi(dmi_dir, "chassis_asset_tag") == AZURE_ASSET_TAG:
        return "azure"
    return None


def poller_for(
    mode: str,
    *,
    base_url: str | None = None,
    dmi_dir: Path | None = None,
    interval: float = 5.0,
) -> Poller | None:
    """The poller --preemption asks for; None for off, or for auto off a cloud."""
    if dmi_dir is None:
        dmi_dir = Path(os.environ.get(ENV_DMI_DIR) or DMI_DIR)
    if mode not in MODES:
        raise ConfigError(
            f"unknown preemption mode {mode!r} (--preemption): use one of {', '.join(MODES)}"
        )
    if mode == "off":
        return None
    cloud = detect(dmi_dir) if mode == "auto" else mode
    if cloud is None:
        return None
    base = base_url or os.environ.get(ENV_METADATA_URL) or DEFAULT_BASE[cloud]
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme != "http" or not parsed.netloc:
        raise ConfigError(f"metadata URL {base!r} is not http://HOST[:PORT] ({ENV_METADATA_URL})")
    kinds: dict[str, type[Poller]] = {"aws": AwsPoller, "gcp": GcpPoller, "azure": AzurePoller}
    return kinds[cloud](base.rstrip("/"), interval=interval)


class Poller(abc.ABC):
    cloud: str
    #: True if one poll waits for a change itself (GCP), so no pause between polls.
    waits = False

    def __init__(self, base_url: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        self.base_url = base_url
        self.interval = interval
        self.timeout = timeout
        # Never through a proxy: HTTP_PROXY must not see metadata requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def describe(self) -> str:
        """What is watched, for the start banner."""
        where = "" if self.base_url == DEFAULT_BASE[self.cloud] else f" at {self.base_url}"
        return f"{self.WHAT}{where}"

    WHAT = ""

    @abc.abstractmethod
    def check(self) -> Notice | None:
        """One poll: the notice if one is out, else None. MetadataError on
        transport errors and answers the API does not give."""

    def _poll(self) -> Notice | None:
        return self.check()

    def watch(
        self,
        stop: threading.Event,
        on_notice: Callable[[Notice], None],
        on_error: Callable[[str], None],
        polled: threading.Event | None = None,
    ) -> None:
        """Poll until a final notice (given to on_notice once) or until stop is
        set; a notice that is not final (an AWS hibernation) is given once and
        polling goes on. An error is reported once per streak. `polled` is set
        once the first poll has answered or failed (after on_notice)."""
        last_error = ""
        seen: set[Notice] = set()
        while not stop.is_set():
            try:
                notice = self._poll()
            except MetadataError as exc:
                if polled is not None:
                    polled.set()
                if str(exc) != last_error:
                    on_error(str(exc))
                    last_error = str(exc)
                stop.wait(self.interval)
                continue
            last_error = ""
            if notice is not None and notice not in seen:
                seen.add(notice)
                on_notice(notice)
            if polled is not None:
                polled.set()
            if notice is not None and notice.final:
                return
            if not self.waits or notice is not None:
                stop.wait(self.interval)

    def _request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        timeout: float | None = None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """(status, body, headers with lower-case names); MetadataError only when
        nothing answered."""
        url = self.base_url + path
        req = urllib.request.Request(url, method=method, headers=dict(headers))
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.read(), _lower(resp.headers.items())
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                return exc.code, exc.read(), _lower(exc.headers.items())
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # HTTPException: a truncated body, a garbage status line.
            reason = getattr(exc, "reason", exc) or type(exc).__name__
            raise MetadataError(f"{self.cloud} metadata service at {url}: {reason}") from exc

    def _unexpected(self, path: str, status: int, body: bytes) -> MetadataError:
        text = body[:200].decode(errors="replace").strip()
        return MetadataError(f"{self.cloud} metadata {path}: HTTP {status} {text!r}")


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


class AwsPoller(Poller):
    cloud = "aws"
    WHAT = "the spot instance-action notice (IMDSv2)"
    TOKEN_PATH = "/latest/api/token"
    ACTION_PATH = "/latest/meta-data/spot/instance-action"
    TOKEN_TTL = 21600

    def __init__(self, base_url: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        super().__init__(base_url, interval=interval, timeout=timeout)
        self._token: str | None = None

    def _get_token(self) -> str:
        if self._token is None:
            headers = {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL)}
            status, body, _ = self._request("PUT", self.TOKEN_PATH, headers)
            if status != 200 or not body.strip():
                raise self._unexpected(self.TOKEN_PATH, status, body)
            self._token = body.decode().strip()
        return self._token

    def check(self) -> Notice | None:
        for _ in range(2):  # a token that expired: fetch a new one, once
            headers = {"X-aws-ec2-metadata-token": self._get_token()}
            status, body, _ = self._request("GET", self.ACTION_PATH, headers)
            if status == 401:
                self._token = None
                continue
            if status == 404:
                return None
            if status != 200:
                raise self._unexpected(self.ACTION_PATH, status, body)
            try:
                doc = json.loads(body)
                action = str(doc["action"])
                when = str(doc["time"])
                deadline = float(calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ")))
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise self._unexpected(self.ACTION_PATH, status, body) from exc
            return Notice("aws", action, deadline, f"spot instance-action at {when}")
        raise MetadataError(f"aws metadata {self.ACTION_PATH}: every token refused (HTTP 401)")


class GcpPoller(Poller):
    cloud = "gcp"
    WHAT = "instance/preempted (wait_for_change)"
    PATH = "/computeMetadata/v1/instance/preempted"
    HEADERS: ClassVar[Mapping[str, str]] = {"Metadata-Flavor": "Google"}
    #: How long one wait_for_change request hangs before it is asked again
    #: (also how long a stop may take to be noticed by watch()).
    WAIT = 5

    def __init__(self, base_url: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        super().__init__(base_url, interval=interval, timeout=timeout)
        self._etag: str | None = None

    @property
    def waits(self) -> bool:  # type: ignore[override]
        """Only with an ETag can a request wait for the change; without one
        (an odd proxy) it polls every `interval` like the others."""
        return self._etag is not None

    def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> Notice | None:
        if status != 200:
            raise self._unexpected(self.PATH, status, body)
        self._etag = headers.get("etag") or self._etag
        value = body.decode(errors="replace").strip().upper()
        if value == "TRUE":
            return Notice("gcp", "preempted", time.time() + GCP_WINDOW, "instance/preempted")
        if value == "FALSE":
            return None
        raise self._unexpected(self.PATH, status, body)

    def check(self) -> Notice | None:
        return self._answer(*self._request("GET", self.PATH, self.HEADERS))

    def _poll(self) -> Notice | None:
        """Hang until the value changes (or WAIT s pass): the notice arrives
        the moment GCP sends it, with one request a minute meanwhile."""
        if self._etag is None:
            return self.check()
        query = urllib.parse.urlencode(
            {"wait_for_change": "true", "last_etag": self._etag, "timeout_sec": self.WAIT}
        )
        status, body, headers = self._request(
            "GET", f"{self.PATH}?{query}", self.HEADERS, timeout=self.WAIT + 10
        )
        return self._answer(status, body, headers)


class AzurePoller(Poller):
    cloud = "azure"
    WHAT = "Scheduled Events (Preempt, Terminate)"
    EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
    NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    HEADERS: ClassVar[Mapping[str, str]] = {"Metadata": "true"}
    #: Event types after which this VM is gone.
    FINAL = ("Preempt", "Terminate")
    #: The first request enables Scheduled Events and may take up to two minutes.
    FIRST_TIMEOUT = 120.0

    def __init__(self, base_url: str, *, interval: float = 5.0, timeout: float = 2.0) -> None:
        super().__init__(base_url, interval=interval, timeout=timeout)
        self._name: str | None = None
        self._enabled = False

    def _vm_name(self) -> str:
        if self._name is None:
            status, body, _ = self._request("GET", self.NAME_PATH, self.HEADERS)
            if status != 200:
                raise self._unexpected(self.NAME_PATH, status, body)
            self._name = body.decode(errors="replace").strip()
        return self._name

    def check(self) -> Notice | None:
        name = self._vm_name()
        timeout = self.timeout if self._enabled else self.FIRST_TIMEOUT
        status, body, _ = self._request("GET", self.EVENTS_PATH, self.HEADERS, timeout=timeout)
        if status != 200:
            raise self._unexpected(self.EVENTS_PATH, status, body)
        self._enabled = True
        try:
            events = json.loads(body)["Events"]
            for ev in events:
                kind = str(ev["EventType"])
                resources = [str(r) for r in ev.get("Resources") or ()]
                if kind not in self.FINAL or (resources and name not in resources):
                    continue
                not_before = str(ev.get("NotBefore") or "")
                deadline = (
                    email.utils.parsedate_to_datetime(not_before).timestamp()
                    if not_before
                    else None
                )
                detail = f"scheduled event {ev.get('EventId', '?')}" + (
                    f", not before {not_before}" if not_before else ""
                )
                return Notice("azure", kind, deadline, detail)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise self._unexpected(self.EVENTS_PATH, status, body) from exc
        return None
