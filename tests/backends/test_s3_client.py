"""The S3 backend's transfer contract, in-process against the test-suite's
servers (moto, and s3rver, which checks a signature's key id): `read_into` fills
exactly the caller's view or reports the object's size, a write of a chunk
buffer arrives whole, and the client ckpt opens has a connection pool for the
transfers its caller runs and no body checksums (what goes over the wire is
in test_s3_wire.py).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_cli.backends import NotFound, open_backend
from ckpt_cli.backends.fsspec import FsspecBackend, piecewise_puts, s3_options
from stores import HOST, Store, _launch

S3_KINDS = ["s3-moto", "s3-s3rver"]


@pytest.fixture(params=S3_KINDS)
def s3(request: pytest.FixtureRequest, store_of: Any) -> Store:
    store: Store = store_of(request.param)
    return store


def test_read_into_fills_a_view_of_the_object_size(s3: Store) -> None:
    backend = open_backend(s3.url, s3.storage_options)
    payload = os.urandom(3 * 1024 * 1024 + 5)
    backend.write("chunks/ab/x", payload)
    buf = bytearray(len(payload) + 16)
    buf[-16:] = b"\xee" * 16
    read_into = backend.read_into  # type: ignore[attr-defined]
    assert read_into("chunks/ab/x", memoryview(buf)[: len(payload)]) == len(payload)
    assert bytes(buf[: len(payload)]) == payload
    assert buf[-16:] == b"\xee" * 16, "nothing written beyond the view"


def test_read_into_a_view_of_the_wrong_size_reports_the_size(s3: Store) -> None:
    """A chunk read into a buffer of another size is the caller's error to
    raise (ChunkError): read_into returns the object's size and never writes
    past the view, for a longer object as for a shorter one."""
    backend = open_backend(s3.url, s3.storage_options)
    payload = os.urandom(100_000)
    backend.write("chunks/cd/y", payload)
    read_into = backend.read_into  # type: ignore[attr-defined]
    for length in (len(payload) - 1, len(payload) + 1, 10):
        buf = bytearray(length + 8)
        assert read_into("chunks/cd/y", memoryview(buf)[:length]) == len(payload)
        assert buf[length:] == bytes(8), f"nothing past a view of {length}"
    with pytest.raises(NotFound):
        read_into("chunks/cd/absent", memoryview(bytearray(10)))


def test_write_of_a_chunk_buffer_view_sends_it_whole(s3: Store) -> None:
    """A view of the whole of a bytearray (a chunk buffer) goes out without a
    copy; a view of part of one is copied; both arrive byte for byte."""
    backend = open_backend(s3.url, s3.storage_options)
    buf = bytearray(os.urandom(2 * 1024 * 1024))
    backend.write("chunks/ef/whole", memoryview(buf))
    backend.write("chunks/ef/part", memoryview(buf)[:1000])
    assert backend.read("chunks/ef/whole") == bytes(buf)
    assert backend.read("chunks/ef/part") == bytes(buf[:1000])


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_the_pool_follows_the_concurrency(s3: Store, concurrency: int) -> None:
    backend = open_backend(s3.url, s3.storage_options, concurrency=concurrency)
    assert isinstance(backend, FsspecBackend)
    backend.write("probe", b"x")  # the client exists after the first call
    config = backend.fs.s3.meta.config
    assert config.max_pool_connections == max(10, concurrency + 4)
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["payload_signing_enabled"] is False


def test_s3_options_keep_what_the_user_set() -> None:
    """ckpt's client settings fill in only what neither the storage options
    nor the AWS_* variables say; botocore before 1.36 gets no checksum keys.
    A chunk goes out as it is (piecewise_puts) only where nothing in botocore
    reads the body first."""
    env: dict[str, str] = {}
    mine = s3_options({}, pool=12, env=env, checksum_options=True)
    assert mine["config_kwargs"] == {
        "max_pool_connections": 12,
        "parameter_validation": False,
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "s3": {"payload_signing_enabled": False},
    }
    assert piecewise_puts(mine)
    user = {
        "key": "k",
        "config_kwargs": {
            "max_pool_connections": 3,
            "request_checksum_calculation": "when_supported",
            "s3": {"payload_signing_enabled": True, "addressing_style": "path"},
        },
    }
    got = s3_options(
        user, pool=12, env={"AWS_RESPONSE_CHECKSUM_VALIDATION": "x"}, checksum_options=True
    )
    assert got["key"] == "k"
    assert got["config_kwargs"] == {
        "max_pool_connections": 3,
        "parameter_validation": False,
        "request_checksum_calculation": "when_supported",
        "s3": {"payload_signing_enabled": True, "addressing_style": "path"},
    }
    assert not piecewise_puts(got)
    assert user["config_kwargs"]["s3"] == {
        "payload_signing_enabled": True,
        "addressing_style": "path",
    }
    old = s3_options({}, pool=4, env=env, checksum_options=False)
    assert old["config_kwargs"] == {
        "max_pool_connections": 10,
        "parameter_validation": False,
        "s3": {"payload_signing_enabled": False},
    }
    assert not piecewise_puts(old)


def test_an_abandoned_read_writes_nothing_more() -> None:
    """What read_into's tries write through: once a try is over (it timed
    out, and may still run on the event loop), nothing more lands in the
    caller's view; a piece that would pass the view's end is refused."""
    from ckpt_cli.backends.fsspec import _Sink

    buf = bytearray(8)
    sink = _Sink(memoryview(buf))
    assert sink.put(0, b"abcd") is True
    assert sink.put(6, b"xyz") is False, "past the end"
    sink.close()
    assert sink.put(4, b"efgh") is False
    assert bytes(buf) == b"abcd" + bytes(4)


# ------------------------------------------- presigned GETs (backends.s3get)


def _gets(backend: Any) -> Any:
    """The presigned GETs the backend's store made for its filesystem."""
    store = backend.store
    return store._presigned(store.fs)


def test_chunks_are_got_by_presigned_url_where_the_client_connects_directly(s3: Store) -> None:
    backend = open_backend(s3.url, s3.storage_options)
    assert _gets(backend) is not None
    payload = os.urandom(2 * 1024 * 1024 + 3)
    backend.write("chunks/ef/z", payload)
    buf = bytearray(len(payload))
    assert backend.read_into("chunks/ef/z", memoryview(buf)) == len(payload)  # type: ignore[attr-defined]
    assert bytes(buf) == payload


@pytest.mark.parametrize(
    "case", ["proxy", "requester pays", "anonymous", "extra request parameters"]
)
def test_the_client_path_is_kept_where_a_presigned_url_would_differ(
    case: str, store_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy for the endpoint (HTTP_PROXY), requester pays, anonymous
    access, extra request parameters (SSE-C keys): every GET stays the
    client's own, which knows how to make it."""
    store: Store = store_of("s3-moto")
    options = dict(store.storage_options)
    if case == "proxy":
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    elif case == "requester pays":
        options["requester_pays"] = True
    elif case == "anonymous":
        options["anon"] = True
    else:
        options["s3_additional_kwargs"] = {"SSECustomerAlgorithm": "AES256"}
    from ckpt_cli.backends.s3get import S3Gets

    backend = open_backend(store.url, options)
    assert S3Gets.for_fs(backend.fs) is None  # type: ignore[attr-defined]


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (cert, key) PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_moto(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """moto's S3 server over https on 127.0.0.1 with a certificate of its
    own: (endpoint, the certificate that verifies it)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("cryptography")
    workdir = tmp_path / "tls-moto"
    workdir.mkdir()
    cert, key = _self_signed(workdir, "moto")
    server = _launch(
        "s3-moto-tls",
        workdir,
        lambda port: [
            *(sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)),
            *("-c", str(cert), "-k", str(key)),
        ],
        persistent=False,
    )
    try:
        yield f"https://{HOST}:{server.port}", cert
    finally:
        server.stop()


def _tls_backend(endpoint: str, verify: object) -> Any:
    options = {
        "key": "tls-key",
        "secret": "tls-secret",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1", "verify": verify},
    }
    backend = open_backend("s3://tls-bucket/run", options)
    return backend


def test_presigned_gets_over_https_verify_like_the_client(
    tls_moto: tuple[str, Path], tmp_path: Path
) -> None:
    """Over https the presigned GET verifies the server against the bundle
    the client verifies with (`verify`): a certificate it trusts serves the
    chunk; one signed by another key is refused, never read unverified."""
    import ssl

    endpoint, cert = tls_moto
    backend = _tls_backend(endpoint, str(cert))
    backend.fs.call_s3("create_bucket", Bucket="tls-bucket")
    payload = os.urandom(1024 * 1024 + 1)
    backend.write("chunks/aa/tls", payload)
    gets = _gets(backend)
    assert gets is not None
    buf = bytearray(len(payload))
    assert backend.read_into("chunks/aa/tls", memoryview(buf)) == len(payload)
    assert bytes(buf) == payload
    log = (tmp_path / "tls-moto" / "server.log").read_text(errors="replace")
    assert "/tls-bucket/run/chunks/aa/tls?" in log and "Signature=" in log, log[-2000:]

    other, _key = _self_signed(tmp_path, "other")
    untrusting = _tls_backend(endpoint, str(other))
    refusing = _gets(untrusting)
    assert refusing is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        refusing.read_into("tls-bucket", "run/chunks/aa/tls", None, memoryview(buf), 10.0)
    from ckpt_cli.backends.s3get import S3Gets

    insecure = _tls_backend(endpoint, False)
    assert S3Gets.for_fs(insecure.fs) is None, "verification off: the client's own path"
