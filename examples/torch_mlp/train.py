"""Real PyTorch training on the CPU: a small MLP regressing a synthetic target,
seeded, with a per-epoch shuffle seeded by the epoch number so a retry sees the
same batches. After every epoch, model + optimizer + counters are saved with
ckpt.torch.save (temp name + rename, then commit: durable when it returns).
On its first attempt the run fails at step FAIL_AT_STEP, in the middle of an
epoch, with ckpt.RecoverableError (or SIGKILL with FAIL_MODE=kill): the retry
restarts that epoch from the last save, and ends with the same weights.
"""

import json
import os
import signal

import torch
from torch import nn

import ckpt
import ckpt.torch

EPOCHS = int(os.environ.get("EPOCHS", "6"))
BATCH, SAMPLES, SEED = 32, 512, 0
STEPS_PER_EPOCH = SAMPLES // BATCH
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", str(EPOCHS * STEPS_PER_EPOCH // 2 + 5)))
FAIL_MODE = os.environ.get("FAIL_MODE", "recoverable")  # or "kill"

torch.manual_seed(SEED)
x = torch.randn(SAMPLES, 8)
y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)

cp = ckpt.checkpoint()
saved = ckpt.torch.load("state.pt")
state = {"epoch": 0, "step": 0, "losses": []}
if saved is not None:
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    state = {k: saved[k] for k in state}
start_step = state["step"]
print(
    f"attempt {cp.attempt}: starting at epoch {state['epoch'] + 1} from step {start_step} "
    f"(restored snapshot: {cp.restored or 'none'})",
    flush=True,
)

step = state["step"]
for epoch in range(state["epoch"] + 1, EPOCHS + 1):
    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch))
    total = 0.0
    for i in range(STEPS_PER_EPOCH):
        idx = order[i * BATCH : (i + 1) * BATCH]
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        step += 1
        if cp.attempt == 1 and step == FAIL_AT_STEP:
            print(f"step {step}: simulated failure ({FAIL_MODE})", flush=True)
            if FAIL_MODE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ckpt.RecoverableError(f"simulated failure at step {step}")
    state = {"epoch": epoch, "step": step, "losses": [*state["losses"], total / STEPS_PER_EPOCH]}
    snapshot = ckpt.torch.save(
        {"model": model.state_dict(), "optim": opt.state_dict(), **state}, "state.pt"
    )
    print(f"epoch {epoch}: loss {state['losses'][-1]:.6f} (snapshot {snapshot})", flush=True)

with torch.no_grad():
    final = nn.functional.mse_loss(model(x), y).item()
result = {
    "loss": final,
    "epochs": state["epoch"],
    "steps": state["step"],
    "attempt": cp.attempt,
    "start_step": start_step,
    "snapshot": snapshot,  # the last commit: holds the final state.pt
}
print(f"done: {result['epochs']} epochs, {result['steps']} steps, final loss {final:.6f}")
if os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(result, f)
