"""A directory of per-epoch checkpoint files: logistic regression on synthetic
2-D points in pure Python, writing epoch-N.json (temp name + rename) after
every epoch and keeping the newest three. No explicit commit: `ckpt run`
uploads the files as they appear. A retry resumes from the newest complete
file, found with ckpt.latest_checkpoint (epoch-10 sorts after epoch-9; temp
names and empty files never count). On its first attempt the run fails
half-way with exit code 75 (or SIGKILL with FAIL_MODE=kill).
"""

import json
import math
import os
import random
import signal
import sys
import time

import ckpt

EPOCHS = int(os.environ.get("EPOCHS", "12"))
FAIL_AT_EPOCH = int(os.environ.get("FAIL_AT_EPOCH", str(EPOCHS // 2 + 1)))  # 0: never
FAIL_MODE = os.environ.get("FAIL_MODE", "exit")  # or "kill"
DELAY = float(os.environ.get("EPOCH_DELAY", "0"))  # seconds of pretend work per epoch
KEEP, LR, SEED = 3, 0.5, 7

rng = random.Random(SEED)
points = []
for _ in range(300):
    label = rng.random() < 0.5
    cx = 1.0 if label else -1.0
    points.append((rng.gauss(cx, 0.8), rng.gauss(-cx, 0.8), 1.0 if label else 0.0))

cp = ckpt.checkpoint()
cp.path.mkdir(parents=True, exist_ok=True)
latest = ckpt.latest_checkpoint(cp.path, "epoch-*.json")
if latest is None:
    state = {"epoch": 0, "step": 0, "w": [0.0, 0.0, 0.0], "losses": []}
else:
    state = json.loads(latest.read_text())
start_step = state["step"]
print(
    f"attempt {cp.attempt}: starting at epoch {state['epoch'] + 1} from step {start_step} "
    f"({latest.name if latest else 'no checkpoint file'})",
    flush=True,
)


def save(state: dict) -> None:
    final = cp.path / f"epoch-{state['epoch']}.json"
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, final)  # atomic: readers see the old set of files or the new one
    for old in sorted(cp.path.glob("epoch-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        if int(old.stem.split("-")[1]) <= state["epoch"] - KEEP:
            old.unlink()


w, step = state["w"], state["step"]
for epoch in range(state["epoch"] + 1, EPOCHS + 1):
    if cp.attempt == 1 and epoch == FAIL_AT_EPOCH:
        print(f"epoch {epoch}: simulated failure ({FAIL_MODE})", flush=True)
        if FAIL_MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(75)
    order = list(range(len(points)))
    random.Random(SEED * 1000 + epoch).shuffle(order)
    total = 0.0
    for i in range(0, len(order), 10):
        grad = [0.0, 0.0, 0.0]
        for x1, x2, y in (points[j] for j in order[i : i + 10]):
            p = 1 / (1 + math.exp(-(w[0] * x1 + w[1] * x2 + w[2])))
            total -= math.log(p if y else 1 - p)
            for k, xk in enumerate((x1, x2, 1.0)):
                grad[k] += (p - y) * xk / 10
        w = [wk - LR * gk for wk, gk in zip(w, grad, strict=True)]
        step += 1
    time.sleep(DELAY)
    loss = total / len(points)
    state = {"epoch": epoch, "step": step, "w": w, "losses": [*state["losses"], loss]}
    save(state)
    print(f"epoch {epoch}: loss {loss:.6f}", flush=True)

result = {
    "loss": state["losses"][-1],
    "epochs": state["epoch"],
    "steps": state["step"],
    "attempt": cp.attempt,
    "start_step": start_step,
    "files": sorted(p.name for p in cp.path.glob("epoch-*.json")),
}
print(f"done: {result['epochs']} epochs, {result['steps']} steps, final loss {result['loss']:.6f}")
if os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(result, f)
