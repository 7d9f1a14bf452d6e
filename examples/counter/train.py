"""A counter that stands in for a training loop: it saves its state after every
step, and on its first attempt it fails at step 5 with exit code 75 ("please
retry"). Under `ckpt run` the retry resumes from the saved state, so every step
runs exactly once. Standard library only; no change needed to run it bare.
"""

import json
import os
import sys
import time
from pathlib import Path

STEPS = int(os.environ.get("COUNTER_STEPS", "10"))
FAIL_AT = int(os.environ.get("COUNTER_FAIL_AT", "5"))
DELAY = float(os.environ.get("COUNTER_DELAY", "0.2"))

ckpt_dir = Path(os.environ.get("CKPT_DIR", "checkpoints"))
ckpt_dir.mkdir(parents=True, exist_ok=True)
state_file = ckpt_dir / "state.json"
attempt = int(os.environ.get("CKPT_ATTEMPT", "1"))

state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "total": 0}
print(
    f"attempt {attempt}: starting at step {state['step'] + 1} "
    f"(restored snapshot: {os.environ.get('CKPT_RESTORED') or 'none'})",
    flush=True,
)

for step in range(state["step"] + 1, STEPS + 1):
    if attempt == 1 and step == FAIL_AT:
        print(f"step {step}: simulated spot-instance hiccup, asking for a retry", flush=True)
        sys.exit(75)
    time.sleep(DELAY)  # the "work"
    state = {"step": step, "total": state["total"] + step}
    tmp = state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file)  # atomic: a crash never leaves half a state file
    print(f"step {step}: total {state['total']}", flush=True)

print(f"done: {STEPS} steps, total {state['total']}", flush=True)
