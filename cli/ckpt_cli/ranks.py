"""Which rank of how many nodes this `ckpt run` is: from --rank/--world-size,
or from the environment the job's engine sets. Standard library only.

Precedence, first match wins (README "Several nodes"):
1. --rank / --world-size (or CKPT_RANK / CKPT_WORLD_SIZE, or a config file);
2. torchrun: the child command's `--nnodes N --node_rank R` (`--node-rank`),
   or GROUP_RANK / NODE_RANK with PET_NNODES in the environment;
3. SLURM: SLURM_NODEID / SLURM_NNODES;
4. Kubernetes Indexed Job: JOB_COMPLETION_INDEX (the job's completions, the
   world size, is not in a pod's environment: give --world-size);
5. SkyPilot: SKYPILOT_NODE_RANK / SKYPILOT_NUM_NODES.
Nothing found: rank 0 of 1, a single node.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from ckpt_cli import options
from ckpt_cli.errors import ConfigError

#: Most ranks a world may have (a sanity bound on what an environment says).
MAX_WORLD = options.MAX_WORLD


@dataclasses.dataclass(frozen=True)
class Identity:
    rank: int
    world_size: int
    #: Where each came from, as --print-config and the banner say it.
    rank_source: str
    world_source: str

    @property
    def multi(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        src = (
            self.rank_source
            if self.rank_source == self.world_source
            else f"{self.rank_source}, {self.world_source}"
        )
        return f"rank {self.rank} of {self.world_size} ({src})"


def _int(value: str, what: str, flag: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{what} is {value!r}, not a whole number ({flag})") from None
    return n


def _torchrun_argv(command: Sequence[str]) -> tuple[str | None, str | None]:
    """(--node_rank, --nnodes) of a torchrun command line, as given."""
    args = list(command)
    start = None
    for i, a in enumerate(args):
        base = os.path.basename(a)
        if base == "torchrun":
            start = i + 1
            break
        if a == "-m" and i + 1 < len(args) and args[i + 1] == "torch.distributed.run":
            start = i + 2
            break
    if start is None:
        return None, None
    rank = nnodes = None
    i = start
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            break  # the training script: its own flags are not torchrun's
        name, eq, value = a.partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if name in ("--node_rank", "--node-rank"):
            rank = value
        elif name == "--nnodes":
            nnodes = value
        if not eq and name.startswith("--") and i + 1 < len(args):
            nxt = args[i + 1]
            # flags with a value take the next word; switches (no value) do not
            if not nxt.startswith("-") and name not in _TORCHRUN_SWITCHES:
                i += 1
        i += 1
    return rank, nnodes


#: torchrun options that take no value.
_TORCHRUN_SWITCHES = frozenset(
    {"--standalone", "--no-python", "--no_python", "--module", "-m", "--run-path", "--run_path"}
)


def detect(
    rank: int | None,
    world_size: int | None,
    env: Mapping[str, str],
    command: Sequence[str] = (),
    *,
    rank_source: str = "--rank",
    world_source: str = "--world-size",
) -> Identity:
    """The identity of this run; ConfigError for a rank outside the world."""
    found_rank: tuple[int, str] | None = None if rank is None else (rank, rank_source)
    found_world: tuple[int, str] | None = None if world_size is None else (world_size, world_source)
    for rank_var, world_var, _engine in _engines(env, command):
        if found_rank is None and rank_var is not None:
            found_rank = (_int(rank_var[1], rank_var[0], "--rank"), rank_var[0])
        if found_world is None and world_var is not None:
            found_world = (_int(world_var[1], world_var[0], "--world-size"), world_var[0])
        if found_rank is not None and found_world is not None:
            break
    if found_rank is None and found_world is None:
        return Identity(0, 1, "one node", "one node")
    if found_world is None:
        assert found_rank is not None
        raise ConfigError(
            f"rank {found_rank[0]} (from {found_rank[1]}) but no world size: pass "
            "--world-size (for a Kubernetes Indexed Job: the job's completions)"
        )
    if found_rank is None:
        if found_world[0] == 1:
            found_rank = (0, found_world[1])
        else:
            raise ConfigError(
                f"world size {found_world[0]} (from {found_world[1]}) but no rank: pass --rank"
            )
    r, w = found_rank[0], found_world[0]
    if not 1 <= w <= MAX_WORLD:
        raise ConfigError(
            f"world size {w} (from {found_world[1]}) must be between 1 and {MAX_WORLD} "
            "(--world-size)"
        )
    if not 0 <= r < w:
        raise ConfigError(
            f"rank {r} (from {found_rank[1]}) is outside a world of {w} "
            f"(from {found_world[1]}): ranks are 0..{w - 1} (--rank)"
        )
    return Identity(r, w, found_rank[1], found_world[1])


def _engines(
    env: Mapping[str, str], command: Sequence[str]
) -> list[tuple[tuple[str, str] | None, tuple[str, str] | None, str]]:
    """(rank (source, value), world (source, value), engine) per engine, in order."""
    out: list[tuple[tuple[str, str] | None, tuple[str, str] | None, str]] = []
    argv_rank, argv_nnodes = _torchrun_argv(command)
    if argv_rank is not None or argv_nnodes is not None:
        nnodes = argv_nnodes
        # "--nnodes 1:4" is an elastic range: not a fixed world
        world = ("torchrun --nnodes", nnodes) if nnodes and ":" not in nnodes else None
        out.append(
            (("torchrun --node_rank", argv_rank) if argv_rank is not None else None, world, "t")
        )
    for var in ("GROUP_RANK", "NODE_RANK"):
        if env.get(var):
            nn = env.get("PET_NNODES")
            world = ("PET_NNODES", nn) if nn and ":" not in nn else None
            out.append(((var, env[var]), world, "torchrun"))
            break
    if env.get("SLURM_NODEID") or env.get("SLURM_NNODES"):
        out.append(
            (
                ("SLURM_NODEID", env["SLURM_NODEID"]) if env.get("SLURM_NODEID") else None,
                ("SLURM_NNODES", env["SLURM_NNODES"]) if env.get("SLURM_NNODES") else None,
                "slurm",
            )
        )
    if env.get("JOB_COMPLETION_INDEX"):
        out.append((("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"]), None, "k8s"))
    if env.get("SKYPILOT_NODE_RANK") or env.get("SKYPILOT_NUM_NODES"):
        out.append(
            (
                ("SKYPILOT_NODE_RANK", env["SKYPILOT_NODE_RANK"])
                if env.get("SKYPILOT_NODE_RANK")
                else None,
                ("SKYPILOT_NUM_NODES", env["SKYPILOT_NUM_NODES"])
                if env.get("SKYPILOT_NUM_NODES")
                else None,
                "skypilot",
            )
        )
    return out
