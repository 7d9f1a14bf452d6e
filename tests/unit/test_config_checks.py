"""The options of issue 16's checks through config: --check GLOB=COMMAND
(repeatable), the [checks] table, CKPT_CHECKS, --check-timeout,
--no-format-checks and --settle-timeout; from every source, with one-line
errors, into RunConfig and back out of --print-config."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from ckpt._contract import ExitCode
from ckpt_cli import config
from ckpt_cli.errors import ConfigError

PY = sys.executable


def _load(
    tmp_path: Path,
    flags: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    toml: str | None = None,
) -> config.Settings:
    if toml is not None:
        (tmp_path / "ckpt.toml").write_text(toml)
    return config.load({"command": ["true"], **(flags or {})}, environ=env or {}, cwd=tmp_path)


def test_defaults(tmp_path: Path) -> None:
    cfg = config.run_config(_load(tmp_path))
    assert cfg.settle_timeout == 120.0 and cfg.format_checks is True and cfg.checks == ()


def test_checks_from_flags_env_and_file(tmp_path: Path) -> None:
    flags = {"check": [f"*.msgpack={PY} -m verify", f"shards/*.bin={PY} -c pass"]}
    cfg = config.run_config(_load(tmp_path, flags=flags | {"check_timeout": 5.0}))
    assert [(c.glob, c.argv, c.timeout) for c in cfg.checks] == [
        ("*.msgpack", (PY, "-m", "verify"), 5.0),
        ("shards/*.bin", (PY, "-c", "pass"), 5.0),
    ]
    env = {"CKPT_CHECKS": f'{{"*.x": ["{PY}", "-c", "pass", "{{}}"]}}', "CKPT_CHECK_TIMEOUT": "7"}
    cfg = config.run_config(_load(tmp_path, env=env))
    assert [(c.glob, c.argv, c.timeout) for c in cfg.checks] == [
        ("*.x", (PY, "-c", "pass", "{}"), 7.0)
    ]
    file = tmp_path / "f"
    file.mkdir()
    cfg = config.run_config(
        _load(file, toml=f'no-format-checks = true\nsettle-timeout = 0\n[checks]\n"*.y" = "{PY}"\n')
    )
    assert cfg.format_checks is False and cfg.settle_timeout == 0.0
    assert [c.glob for c in cfg.checks] == ["*.y"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"flags": {"check": ["no-equals-sign"]}}, r"^--check 'no-equals-sign': expected GLOB="),
        ({"flags": {"check": ["*.x=ckpt-no-such-program"]}}, r"^--check '\*.x': ckpt-no-such"),
        ({"env": {"CKPT_CHECKS": "[1]"}}, r"^CKPT_CHECKS is not a JSON object \(e.g. CKPT_"),
        ({"env": {"CKPT_CHECKS": '{"*.x": 1}'}}, r"^CKPT_CHECKS: checks '\*.x': the command is"),
        ({"toml": 'checks = "x"\n'}, r"^ckpt.toml: checks is not a table$"),
        ({"toml": '[checks]\n"*.x" = ""\n'}, r"^ckpt.toml: checks '\*.x': the command is empty$"),
        ({"toml": "settle-timeout = -1\n"}, r"^ckpt.toml: settle-timeout = -1 is below the min"),
        ({"env": {"CKPT_SETTLE_TIMEOUT": "inf"}}, r"^CKPT_SETTLE_TIMEOUT='inf' is above the"),
        ({"env": {"CKPT_CHECK_TIMEOUT": "0"}}, r"^CKPT_CHECK_TIMEOUT='0' is below the minimum 1$"),
        ({"env": {"CKPT_NO_FORMAT_CHECKS": "perhaps"}}, r"^CKPT_NO_FORMAT_CHECKS='perhaps' is"),
    ],
)
def test_bad_values_are_one_line_errors(
    tmp_path: Path, source: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _load(tmp_path, **source)  # type: ignore[arg-type]
    assert "\n" not in str(err.value) and err.value.exit_code == ExitCode.CONFIG


def test_print_config_shows_them_as_toml_that_loads_back(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        flags={"check": [f"*.msgpack={PY} -m verify"], "settle_timeout": 30.0},
        env={"CKPT_NO_FORMAT_CHECKS": "1"},
    )
    text = config.describe(settings, config.run_config(settings))
    doc = tomllib.loads(text)
    assert doc["checks"] == {"*.msgpack": f"{PY} -m verify"}
    assert doc["settle-timeout"] == 30.0 and doc["no-format-checks"] is True
    assert doc["check-timeout"] == 60.0
    again = tmp_path / "again"
    again.mkdir()
    (again / "ckpt.toml").write_text(text)
    reloaded = config.run_config(config.load({}, environ={}, cwd=again))
    assert [c.argv for c in reloaded.checks] == [(PY, "-m", "verify")]
    assert reloaded.settle_timeout == 30.0 and reloaded.format_checks is False
