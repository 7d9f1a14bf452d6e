"""Secrets never reach the console or a crash log."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from ckpt_cli import console, redact
from ckpt_cli.backends import open_backend
from ckpt_cli.backends.urls import redact_url
from ckpt_cli.errors import write_crash_log

CONN = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsu==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    redact.clear()
    yield
    redact.clear()


def test_storage_option_secrets_are_scrubbed_at_any_depth() -> None:
    redact.register_options(
        {
            "key": "AKIAEXAMPLEKEY",
            "secret": "wJalrXUtnFEMI/K7MDENG",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
            "connection_string": CONN,
            "anon": False,
        }
    )
    text = f"failed with AKIAEXAMPLEKEY / wJalrXUtnFEMI/K7MDENG on {CONN} at http://127.0.0.1:9000"
    out = redact.scrub(text)
    assert "AKIAEXAMPLEKEY" not in out
    assert "wJalrXUtnFEMI" not in out
    assert "Eby8vdM02xNOcqFl" not in out
    assert "http://127.0.0.1:9000" in out, "endpoints are not secrets"


def test_account_key_inside_a_connection_string_is_scrubbed_alone() -> None:
    redact.register_options({"connection_string": CONN})
    key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsu=="
    assert redact.scrub(f"signature computed with {key}") == "signature computed with ***"


def test_env_credentials_are_registered() -> None:
    redact.register_env({"AWS_SECRET_ACCESS_KEY": "env-secret-value", "HOME": "/root"})
    assert redact.scrub("env-secret-value /root") == "*** /root"


def test_url_passwords_are_scrubbed_even_unregistered() -> None:
    assert redact.scrub("sftp://me:hunter22@host/x") == "sftp://me:***@host/x"
    assert redact_url("sftp://me:hunter22@host:2222/x") == "sftp://host:2222/x"


def test_short_values_are_not_treated_as_secrets() -> None:
    redact.register_options({"token": "anon"})
    assert redact.scrub("anonymous anon") == "anonymous anon"


def test_console_lines_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    console.configure()
    open_backend("memory://redact-test", {"secret": "very-secret-value"})
    console.error("upload failed: very-secret-value rejected")
    console.configure()
    assert "very-secret-value" not in buf.getvalue()
    assert "***" in buf.getvalue()


def test_crash_log_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    redact.register("crash-secret-value")
    try:
        raise RuntimeError("boom with crash-secret-value")
    except RuntimeError as exc:
        path = write_crash_log(exc)
    assert path is not None
    text = path.read_text()
    assert "crash-secret-value" not in text
    assert "boom with ***" in text


def test_crash_log_argv_hides_storage_option_values(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["ckpt", "run", "-o", "secret=abc123xyz", "--storage-option=key=AKIA99", "--"]
    monkeypatch.setattr("sys.argv", [*argv, "train.py", "-o", "out.txt"])
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        path = write_crash_log(exc)
    assert path is not None
    text = path.read_text()
    assert "abc123xyz" not in text
    assert "AKIA99" not in text
    assert "-o secret=*** --storage-option=key=*** -- train.py -o out.txt" in text


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["-osecret=abc123xyz"], "-osecret=***"),
        (["-qoaccount_key=abc123xyz"], "-qoaccount_key=***"),
        (["-qo", "token=abc123xyz"], "-qo token=***"),
        (["--storage-option", "sas=abc123xyz"], "--storage-option sas=***"),
        (["-d", "models", "-q"], "-d models -q"),
        (["-dmodels"], "-dmodels"),
        (["--grace", "-1"], "--grace -1"),
    ],
)
def test_crash_log_argv_hides_every_form_of_storage_option(argv: list[str], shown: str) -> None:
    from ckpt_cli.errors import _redacted_argv

    assert _redacted_argv(["ckpt", "run", *argv]) == f"ckpt run {shown}"


def test_numbers_and_authorization_values_are_secrets() -> None:
    redact.register_options(
        {"password": 987654321, "headers": {"Authorization": "Bearer tok-0123456789"}}
    )
    out = redact.scrub("pw 987654321, header Bearer tok-0123456789, token tok-0123456789")
    assert "987654321" not in out and "tok-0123456789" not in out, out


def test_masked_options_mask_secret_keys_whatever_their_values() -> None:
    options = {"password": 12, "client_kwargs": {"api_key": ["a"], "region": "eu"}, "anon": True}
    assert redact.masked_options(options) == {
        "password": "***",
        "client_kwargs": {"api_key": "***", "region": "eu"},
        "anon": True,
    }


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("sftp://me:p@ss@host/x", "sftp://me:***@host/x"),
        ("https://a.blob/c?sv=1&sig=abc%2Fdef&se=2", "https://a.blob/c?sv=1&sig=***&se=2"),
        (
            "http://h/o?X-Amz-Signature=ff00&X-Amz-Date=1",
            "http://h/o?X-Amz-Signature=***&X-Amz-Date=1",
        ),
        ("http://host:9000/path me@example.com", "http://host:9000/path me@example.com"),
    ],
)
def test_url_credentials_are_scrubbed(text: str, shown: str) -> None:
    assert redact.scrub(text) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name.bin", "plain name.bin"),
        ("évolution ✓ 日本", "évolution ✓ 日本"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("t\x1b]0;x\x07", "t\\x1b]0;x\\x07"),
        ("c1\x9bcsi", "c1\\x9bcsi"),
        ("del\x7f", "del\\x7f"),
        ("line\nbreak\ttab\rcr", "line\\nbreak\\ttab\\rcr"),
        ("rtl\u202eexe", "rtl\\u202eexe"),
        ("undecodable\udcff", "undecodable\\udcff"),
        ("back\\slash", "back\\slash"),
    ],
)
def test_printable_escapes_what_a_terminal_acts_on(text: str, shown: str) -> None:
    assert redact.printable(text) == shown


def test_json_documents_are_scrubbed_and_strict() -> None:
    redact.register("doc-secret-value")
    doc = {"remote": "sftp://u:pw@h/x", "k": ["doc-secret-value", 1.5, float("nan"), None]}
    assert redact.scrub_doc(doc) == {"remote": "sftp://u:***@h/x", "k": ["***", 1.5, None, None]}
