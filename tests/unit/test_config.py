"""Path and remote validation, the default remote, --storage-option parsing, and
where each setting of `ckpt run` comes from (flag > env > file > default)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt._contract import ExitCode
from ckpt_cli import config, redact
from ckpt_cli.backends.urls import parse_storage_options
from ckpt_cli.config import check_remote_outside, default_remote, resolve_dir
from ckpt_cli.errors import ConfigError
from ckpt_cli.policy import parse_backoff, parse_retry_on

# ---------------------------------------------------------------- resolve_dir


def test_resolve_dir_refuses_root() -> None:
    with pytest.raises(ConfigError, match="root"):
        resolve_dir("/")


def test_resolve_dir_refuses_root_via_dotdot(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        resolve_dir("/" + "../" * (len(tmp_path.parts) + 2))


def test_resolve_dir_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_dir(f)


def test_resolve_dir_refuses_home() -> None:
    home = Path(os.environ["HOME"])
    assert home.is_dir()
    with pytest.raises(ConfigError, match="home"):
        resolve_dir(home)
    with pytest.raises(ConfigError, match="home"):
        resolve_dir("~")
    with pytest.raises(ConfigError, match="home"):
        resolve_dir(str(home / "sub" / ".."))


def test_resolve_dir_refuses_home_via_symlink(tmp_path: Path) -> None:
    link = tmp_path / "to-home"
    link.symlink_to(os.environ["HOME"])
    with pytest.raises(ConfigError):
        resolve_dir(link)


def test_resolve_dir_refuses_home_when_home_is_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOME itself may be a symlink (e.g. /home -> /data/home on clusters): the
    resolved --dir is compared with the resolved home, not the raw $HOME."""
    real_home = tmp_path / "real-home"
    real_home.mkdir()
    linked_home = tmp_path / "home-link"
    linked_home.symlink_to(real_home)
    monkeypatch.setenv("HOME", str(linked_home))
    with pytest.raises(ConfigError, match="home"):
        resolve_dir("~")
    with pytest.raises(ConfigError, match="home"):
        resolve_dir(real_home)


def test_resolve_dir_accepts_below_home() -> None:
    sub = Path(os.environ["HOME"]) / "ckpts"
    assert resolve_dir("~/ckpts") == Path(os.path.realpath(sub))


def test_resolve_dir_accepts_existing_and_missing(tmp_path: Path) -> None:
    existing = tmp_path / "d"
    existing.mkdir()
    assert resolve_dir(existing) == Path(os.path.realpath(existing))
    missing = tmp_path / "not" / "yet"
    assert resolve_dir(str(missing)) == Path(os.path.realpath(missing))
    assert not missing.exists()  # resolving never creates


def test_resolve_dir_relative_and_symlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    resolved = resolve_dir("link")
    assert resolved.is_absolute()
    assert resolved == Path(os.path.realpath(real))


# ---------------------------------------------------------------- check_remote_outside


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    d = tmp_path / "work" / "ckpt"
    d.mkdir(parents=True)
    return Path(os.path.realpath(d))


@pytest.mark.parametrize("where", ["store", "a/b/store", ""])
def test_remote_inside_dir_refused(ckdir: Path, where: str) -> None:
    remote = str(ckdir / where) if where else str(ckdir)
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, remote)


def test_remote_inside_dir_refused_as_file_url(ckdir: Path) -> None:
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, f"file://{ckdir}/store")


def test_remote_inside_dir_via_symlink_refused(ckdir: Path, tmp_path: Path) -> None:
    link = tmp_path / "alias"
    link.symlink_to(ckdir)
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, str(link / "store"))


def test_dir_inside_remote_refused(ckdir: Path) -> None:
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, str(ckdir.parent))
    with pytest.raises(ConfigError):
        check_remote_outside(ckdir, str(ckdir.parent.parent))


@pytest.mark.parametrize("sibling", ["store", "ckpt-store", "ckpt2", "ckp"])
def test_sibling_remote_allowed(ckdir: Path, sibling: str) -> None:
    check_remote_outside(ckdir, str(ckdir.parent / sibling))


@pytest.mark.parametrize("url", ["s3://bucket/ckpt", "gs://b/x", "memory://t", "sftp://host/{dir}"])
def test_non_local_remote_allowed(ckdir: Path, url: str) -> None:
    # even when the URL's path happens to spell the local dir
    check_remote_outside(ckdir, url.format(dir=ckdir))


# ---------------------------------------------------------------- default_remote


def test_default_remote_under_xdg_data_home(tmp_path: Path) -> None:
    data_home = Path(os.environ["XDG_DATA_HOME"])
    d = tmp_path / "run" / "ckpts"
    remote = Path(default_remote(d))
    assert remote.parent == data_home / "ckpt" / "store"
    assert remote.name.startswith("ckpts-")
    assert default_remote(d) == str(remote)  # stable
    assert default_remote(tmp_path / "other" / "ckpts") != str(remote)  # distinct per dir


def test_default_remote_of_a_name_that_is_not_utf8_keeps_every_other_store() -> None:
    """A byte that is not UTF-8 is hashed as that byte; a UTF-8 name keeps the
    store it always had (its digest pinned: sha256 of the path's UTF-8)."""
    raw = b"/data/ck\xffpt"
    odd = Path(os.fsdecode(raw))
    assert Path(default_remote(odd)).name == odd.name + "-" + _digest(raw)
    cafe = "/data/caf\u00e9"
    assert Path(default_remote(Path(cafe))).name == "caf\u00e9-" + _digest(cafe.encode())
    assert default_remote(odd) != default_remote(Path("/data/ck\u00ffpt"))


def _digest(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()[:10]


def test_default_remote_without_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_DATA_HOME")
    remote = Path(default_remote(tmp_path / "d"))
    assert remote.parent == Path(os.environ["HOME"]) / ".local" / "share" / "ckpt" / "store"


def test_default_remote_is_outside_dir(tmp_path: Path) -> None:
    d = tmp_path / "d"
    check_remote_outside(d, default_remote(d))


# ---------------------------------------------------------------- parse_storage_options


def test_storage_options_json_values() -> None:
    opts = parse_storage_options(
        [
            "anon=true",
            "retries=3",
            "ratio=0.5",
            "nothing=null",
            "region=us-east-1",
            'headers={"a": 1}',
            'list=[1, "x"]',
            'quoted="123"',
        ]
    )
    assert opts == {
        "anon": True,
        "retries": 3,
        "ratio": 0.5,
        "nothing": None,
        "region": "us-east-1",
        "headers": {"a": 1},
        "list": [1, "x"],
        "quoted": "123",
    }


def test_storage_options_value_may_contain_equals_and_be_empty() -> None:
    assert parse_storage_options(["token=a=b==", "empty="]) == {"token": "a=b==", "empty": ""}


def test_storage_options_dotted_keys_nest() -> None:
    opts = parse_storage_options(
        [
            "client_kwargs.endpoint_url=http://localhost:9000",
            "client_kwargs.region_name=eu",
            "a.b.c=1",
            "key=k",
        ]
    )
    assert opts == {
        "client_kwargs": {"endpoint_url": "http://localhost:9000", "region_name": "eu"},
        "a": {"b": {"c": 1}},
        "key": "k",
    }


def test_storage_options_empty() -> None:
    assert parse_storage_options([]) == {}


@pytest.mark.parametrize("item", ["novalue", "", "=value", " =x"])
def test_storage_options_not_key_value(item: str) -> None:
    with pytest.raises(ConfigError):
        parse_storage_options([item])


def test_storage_options_conflict() -> None:
    with pytest.raises(ConfigError):
        parse_storage_options(["a=1", "a.b=2"])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sftp://alice:hunter2@host:2222/runs/a", "sftp://host:2222/runs/a"),
        ("sftp://alice@host/runs/a", "sftp://alice@host/runs/a"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("/plain/path", "/plain/path"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    from ckpt_cli.backends.urls import redact_url

    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


# ---------------------------------------------------------------- flag > env > file > default


def _load(
    tmp_path: Path,
    flags: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    toml: str | None = None,
    pyproject: str | None = None,
) -> config.Settings:
    if toml is not None:
        (tmp_path / "ckpt.toml").write_text(toml)
    if pyproject is not None:
        (tmp_path / "pyproject.toml").write_text(pyproject)
    return config.load(flags or {}, environ=env or {}, cwd=tmp_path)


def _sources(settings: config.Settings) -> dict[str, str]:
    return {name: s.source for name, s in settings.values.items()}


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    assert set(_sources(settings).values()) == {"default"}
    assert settings.file is None and settings.notes == ()
    cfg = config.run_config(settings, need_command=False)
    assert cfg.dir == Path(os.path.realpath(tmp_path / "checkpoints"))
    assert cfg.remote_is_default and cfg.remote == default_remote(cfg.dir)
    assert cfg.retry_on == parse_retry_on("75,signals")
    assert cfg.backoff == parse_backoff("1:60")
    defaults = config.RunConfig(command=[], dir=cfg.dir, remote=cfg.remote, storage_options={})
    same = ["retries", "grace", "debounce", "rescan", "keep", "restore", "snapshot"]
    same += ["flush_timeout", "lease_timeout", "excludes", "concurrency", "io_timeout"]
    same += ["snapshots", "checkpoint_signal", "preemption", "quiet", "verbose", "log_json"]
    for field in [*same, "storage_options"]:
        assert getattr(cfg, field) == getattr(defaults, field), field


def test_every_option_has_an_env_var_and_a_file_key() -> None:
    envs = {opt.name: opt.env_var for opt in config.OPTIONS}
    # names users already have in their scripts and unit files
    assert envs["remote"] == "CKPT_REMOTE"
    assert envs["io_timeout"] == "CKPT_IO_TIMEOUT"
    assert envs["preemption"] == "CKPT_PREEMPTION"
    assert envs["storage_option"] == "CKPT_STORAGE_OPTIONS"
    assert envs["retry_on"] == "CKPT_RETRY_ON"
    assert envs["log_json"] == "CKPT_LOG_JSON"
    assert envs["command"] is None  # the command comes from `--` or the file only
    assert len(set(envs.values())) == len(envs)


def _bound(param: Any, name: str) -> Any:
    """A flag's range: on the parameter (typer >= 0.29) or its click type."""
    value = getattr(param, name, None)
    return value if value is not None else getattr(param.type, name, None)


def test_the_table_matches_the_flags_of_ckpt_run() -> None:
    """One table drives env and files; typer's flags (their defaults, shown by
    --help, and their ranges) must say the same."""
    import typer

    from ckpt_cli.main import app

    params = {p.name: p for p in typer.main.get_command(app).commands["run"].params}  # type: ignore[attr-defined]
    assert set(params) - {"print_config"} == set(config.BY_NAME)
    for opt in config.OPTIONS:
        param = params[opt.name]
        default = config._from_flag(opt, param.default)
        assert default == opt.default, opt.name
        assert _bound(param, "min") == opt.min, opt.name
        assert _bound(param, "max") == opt.max, opt.name
        if opt.name != "command":
            flag = param.opts[0].removeprefix("--")
            assert flag in (opt.file_key, *opt.aliases), opt.name


#: (option, file line, env value, flag value, expected value from file/env/flag)
CASES = [
    ("retries", "retries = 5", "6", 7, (5, 6, 7)),
    ("debounce", "debounce = 0.5", "0.25", 0.75, (0.5, 0.25, 0.75)),
    ("debounce", "debounce = 1", "1", 1.0, (1.0, 1.0, 1.0)),  # a TOML integer is a number
    ("backoff", 'backoff = "0"', "2:4", "3", ("0", "2:4", "3")),
    ("no_restore", "no-restore = true", "yes", True, (True, True, True)),
    ("exclude", 'exclude = ["*.log"]', "a,b", ["c"], (["*.log"], ["a", "b"], ["c"])),
    ("remote", 'remote = "/r/file"', "/r/env", "/r/flag", ("/r/file", "/r/env", "/r/flag")),
    (
        "storage_option",
        "[storage_options]\nanon = true",
        '{"anon": false}',
        ["region=eu"],
        ({"anon": True}, {"anon": False}, {"region": "eu"}),
    ),
]


@pytest.mark.parametrize(("name", "line", "env", "flag", "expected"), CASES)
def test_precedence_flag_env_file_default(
    tmp_path: Path, name: str, line: str, env: str, flag: object, expected: tuple[object, ...]
) -> None:
    opt = config.BY_NAME[name]
    var = opt.env_var
    assert var is not None
    (tmp_path / "ckpt.toml").write_text(line + "\n")
    file_only = _load(tmp_path)
    with_env = _load(tmp_path, env={var: env})
    with_flag = _load(tmp_path, flags={name: flag}, env={var: env})
    got = [s.values[name] for s in (file_only, with_env, with_flag)]
    assert [g.value for g in got] == list(expected)
    assert [g.source for g in got] == ["ckpt.toml", f"env {var}", "flag"]
    (tmp_path / "ckpt.toml").unlink()
    assert _load(tmp_path).values[name].source == "default"


def test_values_are_parsed_whatever_their_source(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        env={"CKPT_RETRY_ON": "1,SIGKILL", "CKPT_CHECKPOINT_SIGNAL": "USR2", "CKPT_LOG_JSON": "l"},
        toml='backoff = "2:8"\nsnapshots = "commit"\npreemption = "off"\n',
    )
    cfg = config.run_config(settings, need_command=False)
    assert cfg.retry_on == parse_retry_on("1,SIGKILL")
    assert cfg.checkpoint_signal == int(signal.SIGUSR2)
    assert cfg.backoff == parse_backoff("2:8")
    assert (cfg.snapshots, cfg.preemption) == ("commit", "off")
    assert cfg.log_json == tmp_path / "l"


def test_env_lists_split_on_commas_and_pathsep(tmp_path: Path) -> None:
    raw = f"a, b{os.pathsep}*.tmp2,,"
    assert _load(tmp_path, env={"CKPT_EXCLUDE": raw})["exclude"] == ["a", "b", "*.tmp2"]


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("TRUE", True), ("on", True), ("no", False), ("0", False)]
)
def test_env_booleans(tmp_path: Path, raw: str, value: bool) -> None:
    assert _load(tmp_path, env={"CKPT_QUIET": raw})["quiet"] is value


def test_empty_env_var_is_unset(tmp_path: Path) -> None:
    settings = _load(tmp_path, env={"CKPT_REMOTE": "", "CKPT_RETRIES": "  "}, toml="retries = 1\n")
    assert settings.values["remote"].source == "default"
    assert settings.values["retries"].source == "ckpt.toml"


def test_empty_string_in_file_means_unset(tmp_path: Path) -> None:
    settings = _load(tmp_path, toml='remote = ""\nsnapshot = ""\nlog-json = ""\n')
    assert settings["remote"] is None and settings["snapshot"] is None
    assert config.run_config(settings, need_command=False).remote_is_default


def test_file_keys_take_dashes_underscores_and_aliases(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        toml='retry_on = "any"\nflush-timeout = 5\nexcludes = ["x"]\n'
        '[storage-option]\nclient_kwargs = {endpoint_url = "http://h"}\n',
    )
    assert settings.values["retry_on"].value == "any"
    assert settings["flush_timeout"] == 5.0
    assert settings["exclude"] == ["x"]
    assert settings["storage_option"] == {"client_kwargs": {"endpoint_url": "http://h"}}


def test_same_option_twice_in_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'retry-on' and 'retry_on' set the same option"):
        _load(tmp_path, toml='retry-on = "any"\nretry_on = "none"\n')


def test_pyproject_tool_ckpt(tmp_path: Path) -> None:
    settings = _load(tmp_path, pyproject='[project]\nname = "x"\n[tool.ckpt]\nkeep = 9\n')
    assert settings["keep"] == 9
    assert settings.values["keep"].source == "pyproject.toml [tool.ckpt]"
    assert settings.file == tmp_path / "pyproject.toml"


def test_pyproject_without_tool_ckpt_is_not_a_config_file(tmp_path: Path) -> None:
    settings = _load(tmp_path, pyproject="[tool.ruff]\nline-length = 100\n")
    assert settings.file is None


def test_ckpt_toml_wins_over_pyproject_and_says_so(tmp_path: Path) -> None:
    settings = _load(tmp_path, toml="keep = 2\n", pyproject="[tool.ckpt]\nkeep = 9\nretries = 8\n")
    assert settings["keep"] == 2
    assert settings.values["retries"].source == "default"  # files are not merged
    assert settings.file == tmp_path / "ckpt.toml"
    assert settings.notes == ("ckpt.toml is used; [tool.ckpt] in pyproject.toml is ignored",)


def test_a_broken_pyproject_does_not_matter_beside_ckpt_toml(tmp_path: Path) -> None:
    assert _load(tmp_path, toml="keep = 2\n", pyproject="[tool\n")["keep"] == 2
    (tmp_path / "ckpt.toml").unlink()
    with pytest.raises(ConfigError, match=r"^pyproject.toml is not valid TOML: .*line 1"):
        _load(tmp_path)


def test_only_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text("keep = 2\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    assert config.load({}, environ={}, cwd=sub).values["keep"].source == "default"


def test_command_from_the_file_or_the_command_line(tmp_path: Path) -> None:
    toml = 'command = ["python", "train.py"]\n'
    assert _load(tmp_path, toml=toml)["command"] == ["python", "train.py"]
    assert _load(tmp_path, flags={"command": ["sh"]}, toml=toml)["command"] == ["sh"]
    cfg = config.run_config(_load(tmp_path, toml=toml))
    assert cfg.command == ["python", "train.py"]


def test_no_command_anywhere_is_a_usage_error(tmp_path: Path) -> None:
    settings = _load(tmp_path)
    with pytest.raises(ConfigError, match="no command to run") as err:
        config.run_config(settings)
    assert err.value.exit_code == ExitCode.USAGE


def test_quiet_and_verbose_the_higher_source_wins(tmp_path: Path) -> None:
    settings = _load(tmp_path, flags={"verbose": True}, toml="quiet = true\n")
    assert settings["verbose"] is True and settings["quiet"] is False
    assert "overridden by verbose" in settings.values["quiet"].source
    with pytest.raises(ConfigError, match="contradict"):
        _load(tmp_path, flags={"verbose": True, "quiet": True})


# ---------------------------------------------------------------- sources: errors


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("retires = 3", r"ckpt.toml: unknown key 'retires' \(did you mean 'retries'"),
        ("zzzz = 3", r"ckpt.toml: unknown key 'zzzz' \(known keys: allow-world-change, backoff, "),
        ('retries = "x"', r"^ckpt.toml: retries = 'x' is not an integer$"),
        ("retries = true", r"^ckpt.toml: retries = True is not an integer$"),
        ('grace = "30"', r"^ckpt.toml: grace = '30' is not a number$"),
        ("no-restore = 1", r"^ckpt.toml: no-restore = 1 is not true or false$"),
        ("backoff = 1", r"^ckpt.toml: backoff = 1 is not a string$"),
        ('exclude = "*.log"', r"^ckpt.toml: exclude = '\*.log' is not a list of strings$"),
        ('storage_options = "x"', r"^ckpt.toml: storage_options is not a table$"),
        ("keep = 0", r"^ckpt.toml: keep = 0 is below the minimum 1$"),
        ("concurrency = 65", r"^ckpt.toml: concurrency = 65 is above the maximum 64$"),
        ('backoff = "x"', r"^ckpt.toml: --backoff 'x' is not INITIAL\[:MAX\]"),
        ('preemption = "aws-spot"', r"^ckpt.toml: --preemption 'aws-spot': choose one of"),
        ('checkpoint-signal = "SIGNOPE"', r"^ckpt.toml: --checkpoint-signal 'SIGNOPE' is not"),
        ('checkpoint-signal = "KILL"', r"^ckpt.toml: --checkpoint-signal 'KILL': SIGKILL cannot"),
        ('checkpoint-signal = "SIGRTMIN"', r"^ckpt.toml: --checkpoint-signal 'SIGRTMIN': choose "),
        ('dir = "/"', r"^ckpt.toml: refusing to use the filesystem root"),
        ("retries = [", r"^ckpt.toml is not valid TOML: "),
    ],
)
def test_bad_file_values_are_one_line_errors(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _load(tmp_path, toml=toml + "\n")
    assert "\n" not in str(err.value)
    assert err.value.exit_code == ExitCode.CONFIG


def test_bad_pyproject_values_name_the_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^pyproject.toml \[tool.ckpt\]: retries = 'x' is not"):
        _load(tmp_path, pyproject='[tool.ckpt]\nretries = "x"\n')
    with pytest.raises(ConfigError, match=r"^pyproject.toml \[tool.ckpt\] is not a table$"):
        _load(tmp_path, pyproject='[tool]\nckpt = "x"\n')


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CKPT_RETRIES": "x"}, r"^CKPT_RETRIES='x' is not an integer$"),
        ({"CKPT_RETRIES": "1.5"}, r"^CKPT_RETRIES='1.5' is not an integer$"),
        ({"CKPT_GRACE": "soon"}, r"^CKPT_GRACE='soon' is not a number$"),
        ({"CKPT_GRACE": "inf"}, r"^CKPT_GRACE='inf' is above the maximum 2592000$"),
        ({"CKPT_GRACE": "nan"}, r"^CKPT_GRACE='nan' is not a number$"),
        ({"CKPT_FLUSH_TIMEOUT": "-inf"}, r"^CKPT_FLUSH_TIMEOUT='-inf' is below the minimum 0$"),
        ({"CKPT_QUIET": "maybe"}, r"^CKPT_QUIET='maybe' is not a boolean"),
        ({"CKPT_KEEP": "0"}, r"^CKPT_KEEP='0' is below the minimum 1$"),
        ({"CKPT_IO_TIMEOUT": "0.5"}, r"^CKPT_IO_TIMEOUT='0.5' is below the minimum 1$"),
        ({"CKPT_BACKOFF": "x"}, r"^CKPT_BACKOFF: --backoff 'x' is not INITIAL"),
        ({"CKPT_RETRY_ON": "bogus"}, r"^CKPT_RETRY_ON: 'bogus' in --retry-on is neither"),
        ({"CKPT_SNAPSHOTS": "often"}, r"^CKPT_SNAPSHOTS: --snapshots 'often': choose"),
        ({"CKPT_STORAGE_OPTIONS": "[1]"}, r"^CKPT_STORAGE_OPTIONS is not a JSON object"),
    ],
)
def test_bad_env_values_are_one_line_errors(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, env=env)


def test_a_bad_storage_options_env_var_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, env={"CKPT_STORAGE_OPTIONS": "secret=hunter2-long"})
    assert "hunter2" not in str(err.value)


def test_flag_errors_keep_their_own_words(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--backoff 'x' is not"):
        _load(tmp_path, flags={"backoff": "x"})
    with pytest.raises(ConfigError, match=r"^storage option 'nokv' is not KEY=VALUE"):
        _load(tmp_path, flags={"storage_option": ["nokv"]})


def test_a_value_overridden_by_a_higher_source_is_not_judged(tmp_path: Path) -> None:
    settings = _load(tmp_path, env={"CKPT_RETRIES": "x"}, flags={"retries": 2})
    assert settings["retries"] == 2


# ---------------------------------------------------------------- --print-config


@pytest.fixture
def _no_secrets() -> Iterator[None]:
    redact.clear()
    yield
    redact.clear()


@pytest.mark.usefixtures("_no_secrets")
def test_describe_is_toml_that_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    import tomllib

    first = tmp_path / "a"
    first.mkdir()
    settings = _load(
        first,
        flags={"retries": 7, "exclude": ["*.log", 'we"ird'], "command": ["python", "t.py"]},
        env={"CKPT_DEBOUNCE": "0.5", "CKPT_STORAGE_OPTIONS": '{"anon": true, "n": null}'},
        toml='backoff = "0"\nquiet = true\n[storage_options.client_kwargs]\nregion_name = "eu"\n',
    )
    text = config.describe(settings, config.run_config(settings))
    rows = {
        line.split(" = ", 1)[0]: line.rsplit("  # ", 1)[1]
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert rows["retries"] == "flag"
    assert rows["debounce"] == "env CKPT_DEBOUNCE"
    assert rows["backoff"] == "ckpt.toml"
    assert rows["grace"] == "default"
    assert rows["remote"].startswith("default: the embedded store ")
    assert list(rows) == [opt.file_key for opt in config.OPTIONS]
    doc = tomllib.loads(text)
    assert doc["retries"] == 7 and doc["storage-options"] == {"anon": True}

    again = tmp_path / "b"
    again.mkdir()
    (again / "ckpt.toml").write_text(text)
    reloaded = config.load({}, environ={}, cwd=again)
    for opt in config.OPTIONS:
        if opt.name not in ("dir", "storage_option"):  # dir: relative to another cwd
            assert reloaded.values[opt.name].value == settings.values[opt.name].value, opt.name


@pytest.mark.usefixtures("_no_secrets")
def test_describe_masks_secrets(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        flags={"storage_option": ["secret=wJalrXUtnFEMI", "key=AKIAEXAMPLE", "anon=false"]},
        env={"CKPT_REMOTE": "sftp://alice:hunter2pass@host/runs"},
    )
    text = config.describe(settings, config.run_config(settings, need_command=False))
    for secret in ("wJalrXUtnFEMI", "AKIAEXAMPLE", "hunter2pass"):
        assert secret not in text
    assert 'secret = "***"' in text and "anon = false" in text
    assert "sftp://alice:***@host/runs" in text


def test_the_readme_example_is_a_valid_ckpt_toml(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "docs" / "options.md").read_text()
    example = readme.split("```toml\n# ckpt.toml\n", 1)[1].split("```", 1)[0]
    settings = _load(tmp_path, toml=example)
    assert settings["retries"] == 5 and settings["command"] == ["python", "train.py"]
    assert settings.values["storage_option"].source == "ckpt.toml"


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (float("nan"), {"min": 0}, "is not a number"),
        (float("inf"), {"min": 0, "max": 10}, "is above the maximum 10"),
        (float("-inf"), {"min": 0}, "is below the minimum 0"),
        ("5", {}, "is not a number"),
        (True, {}, "is not a number"),
        (None, {}, "is not a number"),
        (1.5, {"integer": True}, "is not an integer"),
        (1 << 70, {"integer": True, "max": 1 << 62}, f"is above the maximum {1 << 62}"),
    ],
)
def test_check_number_refuses_what_is_not_a_number_in_range(
    value: object, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^thing {message}$"):
        config.check_number(value, "thing", **kwargs)


def test_check_number_passes_inf_only_without_a_maximum() -> None:
    assert config.check_number(float("inf"), "x", min=0) == float("inf")
    assert config.check_number(3, "x", integer=True, min=0, max=3) == 3
    assert config.wait_limit(float("inf")) is None
    assert config.wait_limit(1e300) is None
    assert config.wait_limit(120.0) == 120.0


def test_every_duration_but_the_flush_timeout_has_a_finite_maximum() -> None:
    for opt in config.OPTIONS:
        if opt.kind == "float":
            expected = None if opt.name == "flush_timeout" else config.MAX_SECONDS
            assert opt.max == expected, opt.name


# ---------------------------------------------------------------- the other commands' remote


def test_locate_follows_run_s_precedence(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    store = Path(default_remote(Path(os.path.realpath(ck))))
    env = {"CKPT_REMOTE": "s3://env/r", "CKPT_DIR": str(ck)}
    (tmp_path / "ckpt.toml").write_text('remote = "s3://file/r"\n')
    where = config.locate({"remote": "s3://flag/r"}, environ=env, cwd=tmp_path)
    assert (where.remote, where.source, where.given) == ("s3://flag/r", "flag", True)
    where = config.locate({}, environ=env, cwd=tmp_path)
    assert (where.remote, where.source) == ("s3://env/r", "env CKPT_REMOTE")
    assert where.describe() == "remote: s3://env/r (from env CKPT_REMOTE)"
    where = config.locate({}, environ={"CKPT_DIR": str(ck)}, cwd=tmp_path)
    assert (where.remote, where.source) == ("s3://file/r", "ckpt.toml")
    (tmp_path / "ckpt.toml").unlink()
    with pytest.raises(ConfigError) as err:  # a reader: no store, no guess
        config.locate({}, environ={"CKPT_DIR": str(ck)}, cwd=tmp_path)
    assert err.value.exit_code == ExitCode.CONFIG
    for way in ("--remote", "CKPT_REMOTE", "ckpt.toml"):
        assert way in str(err.value)
    where = config.locate({}, environ={"CKPT_DIR": str(ck)}, cwd=tmp_path, writer=True)
    assert (where.remote, where.source, where.dir) == (str(store), config.EMBEDDED, ck)
    store.mkdir(parents=True)
    assert config.locate({}, environ={"CKPT_DIR": str(ck)}, cwd=tmp_path).remote == str(store)


def test_locate_reads_storage_options_and_only_the_settings_it_needs(tmp_path: Path) -> None:
    (tmp_path / "ckpt.toml").write_text(
        'remote = "s3://b/r"\nretries = "not checked by ls"\nkeep = 5\n'
        "[storage_options]\nanon = true\n"
    )
    where = config.locate({}, environ={}, cwd=tmp_path, names=("keep",))
    assert where.storage_options == {"anon": True}
    assert where.settings["keep"] == 5
    (tmp_path / "ckpt.toml").write_text('remote = "s3://b/r"\nretires = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'retires'"):
        config.locate({}, environ={}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("slots", "values", "taken", "required", "placed"),
    [
        (("remote", "a", "b"), ["1", "2"], (), ("a", "b"), {"a": "1", "b": "2"}),
        (
            ("remote", "a", "b"),
            ["r", "1", "2"],
            (),
            ("a", "b"),
            {"remote": "r", "a": "1", "b": "2"},
        ),
        (("remote", "dir"), [], (), (), {}),
        (("remote", "dir"), ["r"], (), (), {"remote": "r"}),
        (("remote", "dir"), ["d"], ("remote",), (), {"dir": "d"}),
        (("dir", "remote"), ["d", "r"], (), (), {"dir": "d", "remote": "r"}),
        (("dir", "remote"), ["r"], ("dir",), (), {"remote": "r"}),
    ],
)
def test_place_fills_required_slots_first_then_from_the_left(
    slots: tuple[str, ...],
    values: list[str],
    taken: tuple[str, ...],
    required: tuple[str, ...],
    placed: dict[str, str],
) -> None:
    assert config.place("x", slots, values, taken=taken, required=required) == placed


@pytest.mark.parametrize(
    ("slots", "values", "taken", "required"),
    [
        (("remote", "a", "b"), ["1"], (), ("a", "b")),
        (("remote", "a", "b"), ["r", "1", "2"], ("remote",), ("a", "b")),
        (("remote", "dir"), ["r", "d"], ("dir",), ()),
        (("remote",), ["r", "s"], (), ()),
    ],
)
def test_place_refuses_too_many_or_too_few(
    slots: tuple[str, ...], values: list[str], taken: tuple[str, ...], required: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as err:
        config.place("x", slots, values, taken=taken, required=required)
    assert err.value.exit_code == ExitCode.USAGE
    assert "ckpt x --help" in str(err.value)


@pytest.mark.parametrize(
    ("text", "snapshot"),
    [("12", True), ("0", True), ("ab12", True), ("ab12cd34", True), ("abc", False),
     ("ab12cd34e", False), ("./12", False), ("remote", False), ("s3://b/r", False),
     ("AB12", False)],
)  # fmt: skip
def test_names_snapshot(text: str, snapshot: bool) -> None:
    assert config.names_snapshot(text) is snapshot
