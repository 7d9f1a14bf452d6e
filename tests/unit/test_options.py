"""The one declaration of `ckpt run`'s options (options.DECLARED) and what is
derived from it: the table of docs/options.md says the same flags, env vars
and defaults; RunConfig's defaults are the declared ones, parsed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ckpt_cli import config, options

OPTIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "options.md"


def _cells(row: str) -> list[str]:
    """The cells of a Markdown table row (`\\|` is a | inside a cell)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def documented() -> dict[str, tuple[tuple[str, ...], str, str]]:
    """The table of docs/options.md: long flag -> (flag names, env, default)."""
    text = OPTIONS_DOC.read_text()
    table = text.split("| flag | env | default | meaning |\n|---|---|---|---|\n", 1)[1]
    rows: dict[str, tuple[tuple[str, ...], str, str]] = {}
    for row in table.splitlines():
        if not row.startswith("|"):
            break
        flag, env, default, _meaning = _cells(row)
        names = tuple(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", flag))
        rows[names[0]] = (names, env.strip("`"), default)
    return rows


def shown_default(opt: options.Option) -> str:
    """The default as the docs' table shows it: nothing for an unset or false
    one (or what happens then, `unset`), whole seconds without `.0`, words in
    backticks, a path from `./`."""
    value = opt.default
    if value is None or value is False or value in ([], {}):
        return opt.unset
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    return f"`./{value}`" if opt.path else f"`{value}`"


def test_the_docs_table_lists_every_option_as_declared() -> None:
    rows = documented()
    declared = [opt for opt in options.DECLARED if not opt.argument]
    assert list(rows) == [opt.flag_names[0] for opt in declared] + ["--print-config"], (
        "the table lists other options, or in another order, than options.DECLARED"
    )
    for opt in declared:
        names, env, default = rows[opt.flag_names[0]]
        assert names == opt.flag_names, opt.name
        assert env == opt.env_var, opt.name
        assert default == shown_default(opt), opt.name


def test_run_config_defaults_are_the_declared_ones() -> None:
    cfg = config.RunConfig(command=[], dir=Path("/x"), remote="/r", storage_options={})
    for name in ("retries", "grace", "keep", "concurrency", "io_timeout", "crash_loop"):
        assert getattr(cfg, name) == options.BY_NAME[name].default, name
    assert cfg.restore is not options.BY_NAME["no_restore"].default
    assert cfg.format_checks is not options.BY_NAME["no_format_checks"].default
    assert cfg.retry_on == config.policy.parse_retry_on(options.BY_NAME["retry_on"].default)
    assert cfg.excludes == ()


@pytest.mark.parametrize("opt", options.DECLARED, ids=lambda o: o.name)
def test_every_option_has_help_and_its_file_key_as_its_flag(opt: options.Option) -> None:
    """--help explains every option, and a flag names its key in ckpt.toml."""
    assert opt.help.endswith("."), opt.name
    if not opt.argument:
        assert opt.flag_names[0].removeprefix("--") in (opt.file_key, *opt.aliases), opt.name


def test_the_declared_retry_on_is_the_policy_s_default() -> None:
    assert options.BY_NAME["retry_on"].default == config.policy.DEFAULT_RETRY_ON
    assert options.MAX_SECONDS == config.MAX_SECONDS
