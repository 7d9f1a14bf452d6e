"""Epoch-loss task: fit y = 3x - 2 (plus noise) with minibatch SGD in pure
Python, recording the loss of every epoch. After each epoch the whole state
(weights, epoch, step, loss history) is saved with ckpt.checkpoint().write():
atomic, then committed (durable in the remote when it returns). On its first
attempt the run fails half-way with ckpt.RecoverableError (exit 75), or is
killed by SIGKILL (FAIL_MODE=kill); the retry resumes at the next epoch.
"""

import json
import os
import random
import signal
import time

import ckpt

EPOCHS = int(os.environ.get("EPOCHS", "10"))
FAIL_AT_EPOCH = int(os.environ.get("FAIL_AT_EPOCH", str(EPOCHS // 2 + 1)))  # 0: never
FAIL_MODE = os.environ.get("FAIL_MODE", "recoverable")  # or "kill"
DELAY = float(os.environ.get("EPOCH_DELAY", "0"))  # seconds of pretend work per epoch
BATCH, LR, SEED = 8, 0.05, 1234

rng = random.Random(SEED)
data = [(x, 3 * x - 2 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(256))]

cp = ckpt.checkpoint()
saved = cp.read()
state = json.loads(saved) if saved else {"epoch": 0, "step": 0, "w": 0.0, "b": 0.0, "losses": []}
print(
    f"attempt {cp.attempt}: starting at epoch {state['epoch'] + 1} from step {state['step']} "
    f"(restored snapshot: {cp.restored or 'none'})",
    flush=True,
)

w, b, step = state["w"], state["b"], state["step"]
start_step = step
for epoch in range(state["epoch"] + 1, EPOCHS + 1):
    if cp.attempt == 1 and epoch == FAIL_AT_EPOCH:
        print(f"epoch {epoch}: simulated failure ({FAIL_MODE})", flush=True)
        if FAIL_MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ckpt.RecoverableError(f"simulated failure at epoch {epoch}")
    order = list(range(len(data)))
    random.Random(SEED + epoch).shuffle(order)  # per-epoch seed: the same order on a retry
    total = 0.0
    for i in range(0, len(order), BATCH):
        batch = [data[j] for j in order[i : i + BATCH]]
        errs = [(w * x + b - y, x) for x, y in batch]
        w -= LR * 2 * sum(e * x for e, x in errs) / len(batch)
        b -= LR * 2 * sum(e for e, _ in errs) / len(batch)
        total += sum(e * e for e, _ in errs)
        step += 1
    time.sleep(DELAY)
    loss = total / len(data)
    state = {"epoch": epoch, "step": step, "w": w, "b": b, "losses": [*state["losses"], loss]}
    cp.write(json.dumps(state).encode())  # atomic + commit
    print(f"epoch {epoch}: loss {loss:.6f}", flush=True)

result = {
    "loss": state["losses"][-1],
    "epochs": state["epoch"],
    "steps": state["step"],
    "attempt": cp.attempt,
    "start_step": start_step,
    "w": w,
    "b": b,
}
print(f"done: {result['epochs']} epochs, {result['steps']} steps, final loss {result['loss']:.6f}")
if os.environ.get("RESULT_FILE"):
    with open(os.environ["RESULT_FILE"], "w") as f:
        json.dump(result, f)
