"""Secrets ckpt knows about, the one function that hides them in text, and
the one that makes text from outside safe to print.

Storage options and credential env vars are registered when they are read
(and again when a remote is opened); `console` scrubs every line it prints,
`events` every JSON event and `errors` crash logs, so a key, token or
connection string that ends up in an exception message (some storage
libraries echo their arguments) is never shown or written. `printable`
escapes control characters, so a file name, a manifest field or a socket
reply cannot move the cursor, recolour or retitle the user's terminal.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

MASK = "***"
#: Storage-option names whose values are credentials (matched case-insensitively
#: against every key, nested keys included).
_SECRET_KEY = re.compile(
    r"(secret|token|password|passphrase|passwd|credential|connection_string|sas|"
    r"account_key|signature|private|authorization|cookie|api[-_]?key|"
    r"^key$|_key$|^auth$|_auth$|^auth_)",
    re.IGNORECASE,
)
#: Environment variables that hold credentials for the supported stores.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
#: Parts of an Azure-style connection string that are secret on their own.
_CONN_PART = re.compile(r"(?:AccountKey|SharedAccessSignature|SharedAccessKey)=([^;]+)", re.I)
#: user:password@ in URLs (the password runs to the last @ before the path).
_URL_PASSWORD = re.compile(r"(\w+://[^/@:\s]*):([^/\s]*)@")
#: Credentials in a URL's query (presigned URLs, SAS tokens): ?sig=..., &X-Amz-Signature=...
_URL_QUERY_SECRET = re.compile(
    r"([?&](?:sig|signature|secret|token|access_token|sas_token|password|"
    r"x-amz-signature|x-amz-security-token|x-goog-signature)=)[^&#\s]+",
    re.IGNORECASE,
)
#: An HTTP authorization value: the credentials after the scheme are the secret.
_AUTH_SCHEME = re.compile(r"^(?:Bearer|Basic|Token|Digest|SharedKey|AWS4-HMAC-SHA256)\s+(\S.*)$")
#: Shorter values are too likely to occur by accident to be replaced.
_MIN_LEN = 6

_lock = threading.Lock()
_secrets: set[str] = set()


def register(value: object) -> None:
    """Remember a secret (and the secret parts of a connection string or of an
    authorization value). A number is a secret too: `-o password=987654321`
    parses as JSON into an int, and its digits are what must not be shown."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return
    text = str(value)
    if len(text) < _MIN_LEN:
        return
    with _lock:
        _secrets.add(text)
        for part in _CONN_PART.findall(text):
            if len(part) >= _MIN_LEN:
                _secrets.add(part)
        auth = _AUTH_SCHEME.match(text)
        if auth and len(auth.group(1)) >= _MIN_LEN:
            _secrets.add(auth.group(1))


def is_secret_key(key: object) -> bool:
    """A storage-option name whose value is a credential."""
    return bool(_SECRET_KEY.search(str(key)))


def _leaves(value: object) -> list[object]:
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def register_options(options: Mapping[str, Any]) -> None:
    """Register the values of every secret-looking key, at any depth (every
    value below one, whatever its type)."""
    for key, value in options.items():
        if is_secret_key(key):
            for item in _leaves(value):
                register(item)
        elif isinstance(value, Mapping):
            register_options(value)
        elif isinstance(value, str):
            register_connection_parts(value)


def masked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of storage options with the value of every secret-looking key
    replaced by MASK, at any depth (for printing them as settings)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if is_secret_key(key):
            out[key] = MASK
        elif isinstance(value, Mapping):
            out[key] = masked_options(value)
        else:
            out[key] = value
    return out


def register_connection_parts(value: str) -> None:
    for part in _CONN_PART.findall(value):
        register(part)
    auth = _AUTH_SCHEME.match(value)
    if auth:
        register(auth.group(1))


def register_env(environ: Mapping[str, str] = os.environ) -> None:
    for name in SECRET_ENV:
        if environ.get(name):
            register(environ[name])


def scrub(text: str) -> str:
    """text with every registered secret, URL password and credential in a
    URL's query replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    text = _URL_QUERY_SECRET.sub(lambda m: f"{m.group(1)}{MASK}", text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_doc(doc: Any) -> Any:
    """A JSON document with every string in it (keys too) scrubbed; anything
    that is not JSON (a path, say) becomes its scrubbed str(), and a number
    JSON cannot hold (NaN, inf: from a crafted manifest or record) null."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if doc is None or isinstance(doc, bool | int | float):
        return doc
    if isinstance(doc, Mapping):
        return {scrub(str(k)): scrub_doc(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [scrub_doc(v) for v in doc]
    return scrub(str(doc))


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """text scrubbed, with every character a terminal would act on instead of
    show escaped as Python would write it (`\\x1b`, `\\n`, `\\u202e`): C0 and
    C1 controls, DEL, line and paragraph separators, bidirectional overrides
    and other format characters, and lone surrogates (an undecodable byte of
    a file name). For every string from outside (file names, manifests,
    socket replies, error messages of libraries) that ckpt prints."""
    text = scrub(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def clear() -> None:
    """Forget every secret (tests)."""
    with _lock:
        _secrets.clear()
