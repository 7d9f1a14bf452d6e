"""Secrets ckpt knows about, and the one function that hides them in text.

Storage options and credential env vars are registered when a remote is
opened; `console` scrubs every line it prints and `errors` scrubs crash logs,
so a key, token or connection string that ends up in an exception message
(some storage libraries echo their arguments) is never shown or written.
Imports: standard library only.
"""

from __future__ import annotations

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
    r"account_key|signature|private|^key$|_key$)",
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
#: user:password@ in URLs.
_URL_PASSWORD = re.compile(r"(\w+://[^/@:\s]*):([^/@\s]+)@")
#: Shorter values are too likely to occur by accident to be replaced.
_MIN_LEN = 6

_lock = threading.Lock()
_secrets: set[str] = set()


def register(value: object) -> None:
    """Remember a secret string (and the secret parts of a connection string)."""
    if not isinstance(value, str) or len(value) < _MIN_LEN:
        return
    with _lock:
        _secrets.add(value)
        for part in _CONN_PART.findall(value):
            if len(part) >= _MIN_LEN:
                _secrets.add(part)


def register_options(options: Mapping[str, Any]) -> None:
    """Register the values of every secret-looking key, at any depth."""
    for key, value in options.items():
        if isinstance(value, Mapping):
            register_options(value)
        elif _SECRET_KEY.search(str(key)):
            for item in value if isinstance(value, list | tuple) else [value]:
                register(item)
        elif isinstance(value, str):
            register_connection_parts(value)


def register_connection_parts(value: str) -> None:
    for part in _CONN_PART.findall(value):
        register(part)


def register_env(environ: Mapping[str, str] = os.environ) -> None:
    for name in SECRET_ENV:
        if environ.get(name):
            register(environ[name])


def scrub(text: str) -> str:
    """text with every registered secret and URL password replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def clear() -> None:
    """Forget every secret (tests)."""
    with _lock:
        _secrets.clear()
