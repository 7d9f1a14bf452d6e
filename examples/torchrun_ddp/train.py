"""DistributedDataParallel on the CPU (gloo) under torchrun, one `ckpt run` per node.

A small MLP regresses a synthetic target. Each worker's batch is a function of
(step, global rank) alone, so a resumed run sees the very batches an
uninterrupted one would. Every SAVE_EVERY steps each worker saves its
rank-local state (model, optimizer, step) into $CKPT_DIR with torch.save to a
temp name + os.replace; once every worker has saved, local rank 0 of each node
calls ckpt.commit(step=step): the node's snapshot of that step is durable when
it returns. A step counts as restorable only when every node has committed it,
so a replacement node restores the newest step that all nodes committed, and
all nodes start from the same step (CKPT_RESTORED_STEP says which).

If the ranks find different steps in their checkpoints (a node started while
another's last commit was still uploading), they raise ckpt.RecoverableError
together before the first step, and ckpt retries: see README.md.

When any worker is asked to checkpoint (a cloud preemption notice or
`ckpt signal`, delivered as SIGUSR1 through the shim), every worker saves at
the end of the same step: after each step the workers all-reduce the request
flag, so a request that reached one node reaches every rank at once.

Knobs (env): STEPS (total, default 60), SAVE_EVERY (5), STEP_DELAY (seconds of
sleep per step, to make a demo interruptible; 0), RESULT_FILE (a JSON summary,
written by local rank 0 of each node).
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ckpt

STEPS = int(os.environ.get("STEPS", "60"))
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "5"))
STEP_DELAY = float(os.environ.get("STEP_DELAY", "0"))
BATCH, SEED = 32, 0

dist.init_process_group("gloo")  # MASTER_ADDR, RANK, WORLD_SIZE... come from torchrun
rank, world = dist.get_rank(), dist.get_world_size()
local_rank = int(os.environ.get("LOCAL_RANK", "0"))
node = os.environ.get("CKPT_RANK", os.environ.get("GROUP_RANK", "?"))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's batch of a step: the same on every run, another on every rank."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + step * world + rank)
    x = torch.randn(BATCH, 8, generator=g)
    return x, torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]


torch.manual_seed(SEED)  # the same initial weights on every rank (DDP checks the shapes)
model = DistributedDataParallel(
    nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)

cp = ckpt.checkpoint()  # $CKPT_DIR; also installs the checkpoint-signal handler
state_file = Path(cp.path) / f"worker{local_rank}.pt"
state_file.parent.mkdir(parents=True, exist_ok=True)  # outside `ckpt run` too

step = 0
if state_file.exists():
    saved = torch.load(state_file, weights_only=True)
    model.module.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    step = int(saved["step"])

# Every rank must start from the same step. ckpt restores on each node the
# newest step that all nodes committed, but each node decides alone, from what
# the remote holds when it starts: one that starts while another's last commit
# is still uploading may pick the step before it (and with no step-tagged
# commit at all, each node restores its own newest snapshot, "not a consistent
# cut"). One all-reduce tells: if the ranks disagree, ask ckpt for a retry,
# which restores the newest complete step again, rather than let DDP average
# two different models. (torchrun reports the worker's 75 as its own exit 1:
# `ckpt run --retry-on 1,75,signals` retries it.)
lo, hi = torch.tensor([step]), torch.tensor([step])
dist.all_reduce(lo, op=dist.ReduceOp.MIN)
dist.all_reduce(hi, op=dist.ReduceOp.MAX)
if lo.item() != hi.item():
    raise ckpt.RecoverableError(
        f"rank {rank}: the ranks restored different steps ({lo.item()} to {hi.item()}); "
        "retrying from the newest step all nodes committed"
    )
restored = cp.restored_step  # CKPT_RESTORED_STEP: the global step ckpt restored, or None
start_step = step
if state_file.exists():
    print(
        f"rank {rank} (node {node}): resumed at step {step} "
        f"(ckpt restored step {restored}, attempt {cp.attempt})",
        flush=True,
    )
else:
    print(f"rank {rank} (node {node}): no checkpoint, starting at step 0", flush=True)


def save(step: int, reason: str) -> None:
    """Every worker writes its own file (temp + rename: never a torn file);
    after a barrier, one commit per node makes that step durable."""
    tmp = state_file.with_name(state_file.name + ".tmp")  # *.tmp is never snapshotted
    torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, state_file)
    dist.barrier()  # every worker's file of this step is in place
    if local_rank == 0:
        snapshot = ckpt.commit(step=step)
        print(f"rank {rank}: committed step {step} ({reason}, snapshot {snapshot})", flush=True)


notice_saved = False
loss = torch.tensor(0.0)
while step < STEPS:
    x, y = batch(step)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()  # DDP all-reduces the gradients here
    opt.step()
    step += 1
    if STEP_DELAY:
        time.sleep(STEP_DELAY)
    # Asked to checkpoint (a preemption notice reaches one node, not all)? Then
    # all ranks save at the end of this same step, once.
    asked = torch.tensor([int(ckpt.preemption_requested() and not notice_saved)])
    dist.all_reduce(asked, op=dist.ReduceOp.MAX)
    if asked.item():
        notice_saved = True
        save(step, "checkpoint requested")
    elif step % SAVE_EVERY == 0 or step == STEPS:
        save(step, f"every {SAVE_EVERY} steps")

# The replicas are identical (DDP): every rank reports the same checksum.
checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
print(
    f"rank {rank}: done at step {step}, last loss {loss.item():.6f}, "
    f"weights checksum {checksum:.6f}",
    flush=True,
)
if local_rank == 0 and os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(
            {
                "rank": rank,
                "world_size": world,
                "start_step": start_step,
                "restored_step": restored,
                "steps": step,
                "loss": loss.item(),
                "checksum": checksum,
                "attempt": cp.attempt,
            },
            f,
        )
dist.destroy_process_group()
