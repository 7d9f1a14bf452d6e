"""End to end on every real store: `ckpt run --remote URL` around a child that
fails recoverably and then finishes, then `ckpt restore` into a fresh directory
and `ckpt ls --json`, all through the real binary, configured the way a user
would: once through environment variables only, once through --storage-option.
No secret may appear in anything ckpt prints.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import run_ckpt, write_script
from stores import _SAFETY_ENV as SAFETY_ENV
from stores import Store

#: Env every test run gets, whatever the configuration style: nothing may probe
#: a cloud metadata address, gcsfs must not stall on the emulator (stores.py
#: also puts these in os.environ; here they are explicit), calls are bounded.
SAFE_ENV = {**SAFETY_ENV, "CKPT_IO_TIMEOUT": "30"}
#: Bigger than one 8 MiB chunk, so a file goes up as several concurrent chunks.
BIG = 9 * 1024 * 1024 + 123

CHILD = """
    import hashlib, os, sys
    from pathlib import Path

    d = Path(os.environ["CKPT_DIR"])
    attempt = int(os.environ["CKPT_ATTEMPT"])
    big = int(sys.argv[1])

    def blob(seed: int, n: int) -> bytes:
        out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
        while len(out) < n:
            block = hashlib.sha256(block).digest()
            out += block * 64
        return bytes(out[:n])

    def save(name: str, data: bytes) -> None:
        tmp = d / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, d / name)

    import ckpt
    d.mkdir(parents=True, exist_ok=True)
    if attempt == 1:
        save("weights.bin", blob(1, big))
        (d / "sub").mkdir(exist_ok=True)
        save("sub/step.txt", b"1")
        ckpt.commit()
        raise ckpt.RecoverableError("simulated spot loss")
    assert (d / "sub" / "step.txt").read_bytes() == b"1", "attempt 2 sees attempt 1's state"
    save("optimizer.bin", blob(2, 1000))
    save("sub/step.txt", b"2")
    ckpt.commit()
"""


def _blob(seed: int, n: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def _config(store: Store, style: str) -> tuple[list[str], dict[str, str]]:
    """(extra ckpt flags, extra env) for one configuration style."""
    if style == "env":
        return [], {**SAFE_ENV, **store.env}
    return list(store.cli_options), dict(SAFE_ENV)


def _ckpt(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    res = run_ckpt(args, cwd=cwd, env=env, timeout=timeout)
    assert res.returncode == 0, (
        f"ckpt {args[0]} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    )
    return res


def _no_secrets(store: Store, *texts: str) -> None:
    for secret in store.secrets:
        for text in texts:
            assert secret not in text, f"a secret of {store.kind} was printed"


@pytest.mark.slow
@pytest.mark.parametrize("style", ["env", "flags"])
def test_run_retry_then_restore_into_a_fresh_dir(store: Store, style: str, tmp_path: Path) -> None:
    if store.kind == "memory":
        pytest.skip("memory:// lives inside one process; nothing to share between commands")
    flags, env = _config(store, style)
    child = write_script(tmp_path / "train.py", CHILD)
    ck = tmp_path / "ck"

    run = _ckpt(
        [
            "run",
            "--dir",
            str(ck),
            "--remote",
            store.url,
            *flags,
            "--backoff",
            "0",
            "--retries",
            "2",
            "--",
            sys.executable,
            str(child),
            str(BIG),
        ],
        tmp_path,
        env,
    )
    assert "simulated spot loss" in run.stderr
    assert "attempt 2" in run.stderr or "restart" in run.stderr, run.stderr

    fresh = tmp_path / "fresh"
    restored = _ckpt(["restore", store.url, str(fresh), *flags], tmp_path, env)
    assert (fresh / "weights.bin").read_bytes() == _blob(1, BIG)
    assert (fresh / "optimizer.bin").read_bytes() == _blob(2, 1000)
    assert (fresh / "sub" / "step.txt").read_bytes() == b"2"
    assert sorted(p.name for p in fresh.rglob("*")) == sorted(p.name for p in ck.rglob("*"))

    listing = _ckpt(["ls", store.url, *flags, "--json"], tmp_path, env)
    doc = json.loads(listing.stdout)
    snaps = doc["snapshots"]
    assert len(snaps) >= 2, snaps
    assert snaps[0]["attempt"] == 2
    _no_secrets(store, run.stdout, run.stderr, restored.stderr, listing.stdout, listing.stderr)


def _wrong_credentials(store: Store, tmp_path: Path) -> tuple[dict[str, str], str] | None:
    """The store's env with its credential replaced by a wrong one (the endpoint
    stays on loopback), and the wrong secret; None where the server has no auth."""
    env = {**SAFE_ENV, **store.env}
    if store.kind == "s3-s3rver":
        # s3rver 3.7 checks the access key id but not SigV4 signatures (it accepts
        # any secret): an unknown key id is what it rejects (InvalidAccessKeyId).
        wrong = "WRONGKEY" + "X" * 12
        env["AWS_ACCESS_KEY_ID"] = wrong
        return env, wrong
    if store.kind == "azure":
        conn = env["AZURE_STORAGE_CONNECTION_STRING"]
        parts = dict(p.split("=", 1) for p in conn.split(";") if "=" in p)
        wrong = "V3Jvbmcta2V5LW5vdC10aGUtZGV2LWtleQ=="
        env["AZURE_STORAGE_CONNECTION_STRING"] = conn.replace(parts["AccountKey"], wrong)
        return env, wrong
    if store.kind == "sftp":
        key = tmp_path / "not_authorized"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            capture_output=True,
        )
        env["FSSPEC_SFTP_CLIENT_KEYS"] = str(key)
        return env, key.read_text().splitlines()[1]
    return None  # moto and the GCS emulator accept any credentials


def test_wrong_credentials_are_one_clear_line(store: Store, tmp_path: Path) -> None:
    """A rejected credential: one error line naming the remote and saying to check
    the credentials, exit status 69, no traceback, no secret (not even the wrong one)."""
    wrong = _wrong_credentials(store, tmp_path)
    if wrong is None:
        pytest.skip(f"{store.kind}: the test server accepts any credentials")
    env, secret = wrong
    res = run_ckpt(["ls", store.url], cwd=tmp_path, env=env, timeout=180)
    assert res.returncode == 69, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("ckpt: error:")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert secret not in res.stderr
    _no_secrets(store, res.stdout, res.stderr)


def test_missing_bucket_is_one_clear_line_and_nothing_is_created(
    store: Store, tmp_path: Path
) -> None:
    """`ckpt run` against a bucket/container that does not exist: exit 69 before
    the child starts, one line saying so; ckpt never creates buckets."""
    if store.kind in ("memory", "file", "sftp"):
        pytest.skip("no buckets: directories are created as needed")
    scheme = store.url.split("://", 1)[0]
    url = f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:12]}/x"
    marker = tmp_path / "child-ran"
    flags, env = _config(store, "env")
    res = run_ckpt(
        [
            "run",
            "--dir",
            str(tmp_path / "ck"),
            "--remote",
            url,
            *flags,
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w')",
        ],
        cwd=tmp_path,
        env=env,
        timeout=180,
    )
    assert res.returncode == 69, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("ckpt: error:")]
    assert len(errors) == 1, res.stderr
    assert "does not exist" in errors[0], errors[0]
    assert not marker.exists(), "the child does not start without a usable remote"
    assert "Traceback" not in res.stderr
