"""Rank identity: flags, the engines' environments, their precedence, and
what --print-config says about them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_cli import config
from ckpt_cli.errors import ConfigError
from ckpt_cli.ranks import detect

TORCHRUN = ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc-per-node", "1", "train.py"]


def test_nothing_found_is_one_node() -> None:
    ident = detect(None, None, {}, ["python", "train.py"])
    assert (ident.rank, ident.world_size, ident.multi) == (0, 1, False)


def test_flags_win_over_every_engine() -> None:
    env = {"SLURM_NODEID": "3", "SLURM_NNODES": "4", "SKYPILOT_NODE_RANK": "2"}
    ident = detect(1, 2, env, TORCHRUN)
    assert (ident.rank, ident.world_size) == (1, 2)
    assert ident.describe() == "rank 1 of 2 (--rank, --world-size)"


@pytest.mark.parametrize(
    "command",
    [
        TORCHRUN,
        ["/usr/bin/torchrun", "--nnodes=2", "--node-rank=1", "train.py", "--node_rank", "0"],
        ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "2",
         "--node_rank", "1", "train.py"],
    ],
)  # fmt: skip
def test_torchrun_command_line(command: list[str]) -> None:
    ident = detect(None, None, {"SLURM_NODEID": "0", "SLURM_NNODES": "2"}, command)
    assert (ident.rank, ident.world_size) == (1, 2)
    assert "torchrun" in ident.describe()


def test_torchrun_elastic_range_is_not_a_world_size() -> None:
    cmd = ["torchrun", "--nnodes", "1:4", "--node_rank", "0", "train.py"]
    with pytest.raises(ConfigError, match="--world-size"):
        detect(None, None, {}, cmd)
    assert detect(None, 4, {}, cmd).world_size == 4


def test_torchrun_environment() -> None:
    ident = detect(None, None, {"GROUP_RANK": "1", "PET_NNODES": "3"}, ["python", "x.py"])
    assert (ident.rank, ident.world_size) == (1, 3)
    assert ident.rank_source == "GROUP_RANK"


def test_slurm() -> None:
    ident = detect(None, None, {"SLURM_NODEID": "2", "SLURM_NNODES": "4"})
    assert (ident.rank, ident.world_size) == (2, 4)
    assert ident.describe() == "rank 2 of 4 (SLURM_NODEID, SLURM_NNODES)"


def test_slurm_beats_kubernetes_and_skypilot() -> None:
    env = {
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "2",
        "JOB_COMPLETION_INDEX": "0",
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NUM_NODES": "2",
    }
    assert detect(None, None, env).rank == 1


def test_kubernetes_needs_the_world_size() -> None:
    with pytest.raises(ConfigError, match=r"JOB_COMPLETION_INDEX.*--world-size.*completions"):
        detect(None, None, {"JOB_COMPLETION_INDEX": "3"})
    ident = detect(None, 4, {"JOB_COMPLETION_INDEX": "3"})
    assert (ident.rank, ident.world_size) == (3, 4)
    assert ident.describe() == "rank 3 of 4 (JOB_COMPLETION_INDEX, --world-size)"


def test_skypilot() -> None:
    ident = detect(None, None, {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2"})
    assert (ident.rank, ident.world_size) == (1, 2)


@pytest.mark.parametrize(
    ("rank", "world", "env", "message"),
    [
        (2, 2, {}, r"rank 2 \(from --rank\) is outside a world of 2"),
        (None, None, {"SLURM_NODEID": "x", "SLURM_NNODES": "2"}, "not a whole number"),
        (None, 3, {}, "no rank: pass --rank"),
        (None, None, {"SLURM_NODEID": "5", "SLURM_NNODES": "2"}, "outside a world of 2"),
    ],
)
def test_bad_identities_are_one_line_errors(
    rank: int | None, world: int | None, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        detect(rank, world, env)
    assert "\n" not in str(info.value)


def test_world_size_one_alone_is_rank_zero() -> None:
    assert (detect(None, 1, {}).rank, detect(None, 1, {}).world_size) == (0, 1)


def test_print_config_says_where_the_rank_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    settings = config.load({"command": ["python", "t.py"]}, environ={}, cwd=tmp_path)
    cfg = config.run_config(settings)
    assert (cfg.rank, cfg.world_size) == (1, 2)
    text = config.describe(settings, cfg)
    rank_line = next(line for line in text.splitlines() if line.startswith("rank "))
    assert rank_line.split("#")[0].strip() == 'rank = ""', "detected at each start, not fixed"
    assert "detected now: rank 1 of 2 (SLURM_NODEID, SLURM_NNODES)" in rank_line


def test_env_vars_are_flags_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    env = {"CKPT_RANK": "0", "CKPT_WORLD_SIZE": "3"}
    cfg = config.run_config(config.load({"command": ["python", "t.py"]}, environ=env, cwd=tmp_path))
    assert (cfg.rank, cfg.world_size) == (0, 3)
    assert "CKPT_RANK" in cfg.identity_source
