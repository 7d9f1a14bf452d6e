"""The distributions: `python -m build` makes an sdist and a wheel that
`twine check --strict` accepts, whose metadata says what pyproject.toml means,
and the wheel installs offline with pipx and with uv, as users install a CLI.

Nothing here reaches a package index: the build runs with --no-isolation (the
test group carries hatchling), the installs take --no-index and the wheelhouse
tests/install.sh makes (.venv/wheelhouse; CKPT_TEST_WHEELHOUSE overrides it)
and, where the kernel allows it, run in a network namespace with no network at
all. Every tool runs with HOME, XDG_*, pip's, pipx's and uv's dirs in tmp_path.
"""

from __future__ import annotations

import configparser
import email.message
import email.parser
import functools
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import CKPT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
WHEELHOUSE = Path(os.environ.get("CKPT_TEST_WHEELHOUSE") or REPO / ".venv" / "wheelhouse")
INSTALL_HINT = "run `bash tests/install.sh` (it installs the test group and builds the wheelhouse)"
#: Each extra and the one fsspec implementation it pulls in.
EXTRAS = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs", "ssh": "sshfs"}
PROJECT_URLS = {"Homepage", "Documentation", "Issues", "Changelog"}
#: Path components no distribution may contain.
JUNK = {
    *("__pycache__", "node_modules", ".venv", "dist", "build", ".git"),
    *(".pytest_cache", ".mypy_cache", ".ruff_cache"),
}
#: Files each distribution must hold (the sdist: below its top directory).
WHEEL_FILES = (
    *("ckpt_cli/__init__.py", "ckpt_cli/py.typed"),
    *("ckpt/__init__.py", "ckpt/py.typed", "ckpt/ckpt.sh"),
)
SDIST_FILES = (
    *("PKG-INFO", "README.md", "LICENSE", "pyproject.toml"),
    *("cli/ckpt_cli/__init__.py", "cli/ckpt_cli/py.typed"),
    *("shims/ckpt/__init__.py", "shims/ckpt/py.typed", "shims/ckpt/ckpt.sh"),
    *("tests/conftest.py", "tests/install.sh", "tests/servers/package-lock.json"),
)
SDIST_FOLDERS = ("examples", "bench", "docs", "tests/packaging", "tests/integration")
#: Written into the checkout by whatever else runs meanwhile (pytest, ruff,
#: mypy, other xdist workers), never by the build: not counted as its leftovers.
CACHES = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")


def isolated_env(root: Path) -> dict[str, str]:
    """The environment of every tool run here: the real home is never read or
    written, no config file of pip or uv applies, and no index is consulted."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PIPX_", "UV_", "CONDA"))
        and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE")
    }
    home = root / "home"
    dirs = {
        "HOME": home,
        "TMPDIR": root / "tmp",
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
        "XDG_STATE_HOME": home / ".local" / "state",
        "XDG_CACHE_HOME": home / ".cache",
        "XDG_BIN_HOME": home / ".local" / "bin",
        "PIP_CACHE_DIR": root / "pip-cache",
        "PIPX_HOME": root / "pipx",
        "PIPX_BIN_DIR": root / "pipx-bin",
        "PIPX_MAN_DIR": root / "pipx-man",
        "UV_TOOL_DIR": root / "uv-tools",
        "UV_TOOL_BIN_DIR": root / "uv-bin",
        "UV_CACHE_DIR": root / "uv-cache",
        "UV_PYTHON_INSTALL_DIR": root / "uv-python",
    }
    for name in ("HOME", "TMPDIR"):
        dirs[name].mkdir(parents=True, exist_ok=True)
    env.update({name: str(path) for name, path in dirs.items()})
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # neither /etc/pip.conf nor anyone's find-links
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        UV_NO_CONFIG="1",
        UV_OFFLINE="1",
        UV_PYTHON_DOWNLOADS="never",
    )
    return env


def run(argv: list[str | Path], env: dict[str, str], what: str) -> str:
    """Run a tool to completion, insisting on exit 0; return its stdout."""
    res = subprocess.run(
        [str(a) for a in argv],
        env=env,
        cwd=env["TMPDIR"],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert res.returncode == 0, (
        f"{what} exited {res.returncode}\n$ {shlex.join(str(a) for a in argv)}\n"
        f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    )
    return res.stdout


def need_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed in {sys.prefix}: {INSTALL_HINT}")


def need_tool(name: str) -> Path:
    found = BIN_DIR / name
    if found.exists():
        return found
    on_path = shutil.which(name)
    if on_path is None:
        pytest.skip(f"{name} is not installed (not in {BIN_DIR}, not on PATH): {INSTALL_HINT}")
    return Path(on_path)


@functools.cache
def no_network() -> tuple[str, ...]:
    """A command prefix that runs its command in a new network namespace (no
    interface up, so not even a typo'd flag can reach an index), if this
    kernel and user may make one; else nothing, and the flags alone hold."""
    unshare = shutil.which("unshare")
    if unshare is not None:
        for prefix in ((unshare, "--net"), (unshare, "--map-root-user", "--net")):
            probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
            if probe.returncode == 0:
                return prefix
    return ()


def checkout_state() -> set[str] | None:
    """`git status --porcelain --ignored` of the checkout minus caches; None
    when this is not a git checkout (e.g. the tests of an unpacked sdist)."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        return None
    res = subprocess.run(
        [git, "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "--ignored"],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return None
    return {line for line in res.stdout.splitlines() if not any(c in line for c in CACHES)}


def cli_version(env: dict[str, str]) -> str:
    """The version `ckpt --version` prints: "ckpt X" -> "X"."""
    name, version = run([CKPT, "--version"], env, "ckpt --version").split()
    assert name == "ckpt"
    return version


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path
    version: str  # what the dev install's `ckpt --version` prints
    #: `git status` lines the build added to the checkout (None: not a git checkout).
    left_in_checkout: list[str] | None


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist and the wheel, built once per worker (the wheel from the sdist,
    as `python -m build` does by default, so the sdist is proven complete)."""
    need_module("build")
    need_module("hatchling")
    root = tmp_path_factory.mktemp("dist")
    env = isolated_env(root)
    out = root / "out"
    before = checkout_state()
    run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO],
        env,
        "python -m build",
    )
    after = checkout_state()
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, f"expected one sdist and one wheel: {out}"
    left = None if before is None or after is None else sorted(after - before)
    return Dists(sdists[0], wheels[0], cli_version(env), left)


def wheel_metadata(wheel: Path) -> tuple[email.message.Message, dict[str, bytes], str]:
    """METADATA as a message, every file of the wheel, and its .dist-info dir."""
    with zipfile.ZipFile(wheel) as z:
        files = {name: z.read(name) for name in z.namelist()}
    (dist_info,) = {n.split("/")[0] for n in files if n.split("/")[0].endswith(".dist-info")}
    meta = email.parser.BytesParser().parsebytes(files[f"{dist_info}/METADATA"])
    return meta, files, dist_info


def sdist_members(sdist: Path) -> tuple[str, dict[str, tarfile.TarInfo]]:
    """The sdist's top directory and its members by path below it."""
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
    tops = {m.name.split("/")[0] for m in members}
    assert len(tops) == 1, f"the sdist has several top-level entries: {sorted(tops)}"
    (top,) = tops
    return top, {m.name[len(top) + 1 :]: m for m in members if m.name != top}


def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project


def without_marker(requirement: str) -> str:
    req = Requirement(requirement)
    req.marker = None
    return str(req)


# ---------------------------------------------------------------- build and metadata


def test_the_build_leaves_the_checkout_untouched(dists: Dists) -> None:
    if dists.left_in_checkout is None:
        pytest.skip("not a git checkout: nothing to compare the tree with")
    assert dists.left_in_checkout == [], "python -m build wrote into the checkout"


def test_twine_check_strict_passes(dists: Dists, tmp_path: Path) -> None:
    need_module("twine")
    run(
        [sys.executable, "-m", "twine", "check", "--strict", dists.sdist, dists.wheel],
        isolated_env(tmp_path),
        "twine check --strict",
    )


def test_wheel_metadata_says_what_pyproject_means(dists: Dists) -> None:
    meta, files, dist_info = wheel_metadata(dists.wheel)
    project = pyproject()

    assert meta["Name"] == "ckpt-run"
    assert meta["Version"] == dists.version, "the wheel and `ckpt --version` disagree"
    assert dists.wheel.name == f"ckpt_run-{dists.version}-py3-none-any.whl"
    assert meta["Requires-Python"] == ">=3.11" == project["requires-python"]
    assert meta["Description-Content-Type"] == "text/markdown"
    description = meta.get_payload()
    assert isinstance(description, str) and description.startswith("# ckpt")  # the README

    # License: an SPDX expression (metadata 2.4) or, from older backends, License.
    assert (meta["License-Expression"] or meta["License"]) == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    assert not [c for c in classifiers if c.startswith("License ::")], (
        "with an SPDX license expression, License classifiers are not allowed"
    )
    assert "LICENSE" in (meta.get_all("License-File") or [])
    license_text = files.get(f"{dist_info}/licenses/LICENSE") or files.get(f"{dist_info}/LICENSE")
    assert license_text is not None, f"no LICENSE in {dist_info}: {sorted(files)}"
    assert license_text == (REPO / "LICENSE").read_bytes()
    assert b"Apache License" in license_text and b"Version 2.0, January 2004" in license_text

    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Typing :: Typed" in classifiers

    urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL") or [])
    assert set(urls) >= PROJECT_URLS, urls
    assert all(url.startswith("https://") for url in urls.values()), urls

    # Dependencies: exactly pyproject's, the base ones unconditional, each
    # extra's behind its marker, and each extra pulling its fsspec backend.
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    base = {str(r) for r in requires if r.marker is None}
    assert base == {str(Requirement(r)) for r in project["dependencies"]}
    assert set(meta.get_all("Provides-Extra") or []) == set(EXTRAS)
    for extra, package in EXTRAS.items():
        in_extra = [r for r in requires if r.marker and r.marker.evaluate({"extra": extra})]
        assert {canonicalize_name(r.name) for r in in_extra} == {package}, extra
        assert {without_marker(str(r)) for r in in_extra} == {
            str(Requirement(r)) for r in project["optional-dependencies"][extra]
        }

    entry_points = configparser.ConfigParser()
    entry_points.read_string(files[f"{dist_info}/entry_points.txt"].decode())
    assert dict(entry_points["console_scripts"]) == {"ckpt": "ckpt_cli.main:main"}


def test_wheel_carries_both_packages_typed_and_no_junk(dists: Dists) -> None:
    _, files, _ = wheel_metadata(dists.wheel)
    for name in WHEEL_FILES:
        assert name in files, f"{name} is missing from {dists.wheel.name}"
    junk = [n for n in files if JUNK & set(n.split("/")) or n.endswith((".pyc", ".pyo"))]
    assert junk == []


def test_sdist_has_the_sources_and_no_junk(dists: Dists) -> None:
    top, members = sdist_members(dists.sdist)
    assert top == f"ckpt_run-{dists.version}"
    for name in SDIST_FILES:
        assert name in members, f"{name} is missing from {dists.sdist.name}"
    for folder in SDIST_FOLDERS:
        assert any(n.startswith(f"{folder}/") for n in members), f"no {folder}/ in the sdist"
    junk = sorted(n for n in members if JUNK & set(n.split("/")) or n.endswith((".pyc", ".pyo")))
    assert junk == [], f"the sdist ships junk: {junk[:20]}"

    # Every tracked file of the shipped folders is in it (git checkouts only).
    git = shutil.which("git")
    if git is not None and (REPO / ".git").exists():
        tracked = subprocess.run(
            [git, "-C", str(REPO), "ls-files", "cli", "shims", "tests", "examples", "bench"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        missing = [p for p in tracked if p and (REPO / p).is_file() and p not in members]
        assert missing == [], f"tracked files missing from the sdist: {missing}"

    with tarfile.open(dists.sdist) as tar:
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        meta = email.parser.BytesParser().parse(pkg_info)
    assert (meta["Name"], meta["Version"]) == ("ckpt-run", dists.version)
    assert (meta["License-Expression"] or meta["License"]) == "Apache-2.0"


# ---------------------------------------------------------------- offline installs


@pytest.fixture
def wheelhouse() -> Path:
    if not WHEELHOUSE.is_dir() or not any(WHEELHOUSE.glob("*.whl")):
        pytest.skip(
            f"no wheelhouse at {WHEELHOUSE}: {INSTALL_HINT}, or point CKPT_TEST_WHEELHOUSE "
            "at a directory of wheels of ckpt-run[s3]'s dependencies (pip wheel -w DIR '.[s3]')"
        )
    return WHEELHOUSE


def check_installed_tool(app: Path, venv: Path, version: str, env: dict[str, str]) -> None:
    """The installed `ckpt` runs and reports the wheel's version; the s3
    extra's backend imports in the tool's own venv, and ckpt_cli comes from
    that venv, not from the checkout."""
    assert app.exists(), f"{app} was not created"
    assert run([app, "--version"], env, f"{app} --version").split() == ["ckpt", version]
    python = venv / "bin" / "python"
    assert python.exists(), f"no venv at {venv}"
    where = run(
        [python, "-I", "-c", "import s3fs, ckpt_cli; print(ckpt_cli.__file__)"],
        env,
        "import s3fs in the tool's venv",
    ).strip()
    assert Path(where).is_relative_to(venv), f"ckpt_cli imported from {where}, not {venv}"


def test_pipx_installs_the_wheel_with_the_s3_extra_offline(
    dists: Dists, wheelhouse: Path, tmp_path: Path
) -> None:
    pipx = need_tool("pipx")
    env = isolated_env(tmp_path)
    # pip, not uv (which pipx picks when it finds it): uv has a test of its own.
    env["PIPX_DEFAULT_BACKEND"] = "pip"
    # Creating pipx's shared venv would otherwise upgrade pip from the index.
    env["PIPX_DISABLE_SHARED_LIBS_AUTO_UPGRADE"] = "1"
    pip_args = f"--no-index --find-links {shlex.quote(str(wheelhouse))}"
    install = ["install", "--python", sys.executable, f"--pip-args={pip_args}"]
    run([*no_network(), pipx, *install, f"{dists.wheel}[s3]"], env, "pipx install")
    check_installed_tool(
        Path(env["PIPX_BIN_DIR"]) / "ckpt",
        Path(env["PIPX_HOME"]) / "venvs" / "ckpt-run",
        dists.version,
        env,
    )


def test_uv_tool_installs_the_wheel_with_the_s3_extra_offline(
    dists: Dists, wheelhouse: Path, tmp_path: Path
) -> None:
    uv = need_tool("uv")
    env = isolated_env(tmp_path)
    offline: list[str | Path] = ["--offline", "--no-index", "--find-links", wheelhouse]
    spec = f"ckpt-run[s3] @ {dists.wheel.as_uri()}"  # uv's form for a local wheel with extras
    install = ["tool", "install", *offline, "--python", sys.executable, spec]
    run([*no_network(), uv, *install], env, "uv tool install")
    check_installed_tool(
        Path(env["UV_TOOL_BIN_DIR"]) / "ckpt",
        Path(env["UV_TOOL_DIR"]) / "ckpt-run",
        dists.version,
        env,
    )
