#!/usr/bin/env bash
# A bash "training" loop made resumable with the shell shim (ckpt.sh): it sums
# the squares of its steps, saving {step, total} with ckpt_write after every
# step and a "model" file with ckpt_save every 3 steps. On its first attempt it
# asks for a retry (ckpt_retry: exit 75) half-way; `ckpt run` relaunches it and
# it resumes from the saved state, so every step runs once.
#
#   ckpt run -- bash examples/bash/train.sh
#
# Knobs: TRAIN_STEPS (10), TRAIN_FAIL_AT (steps/2 + 1; 0 = never), TRAIN_DELAY (0.1 s).
set -euo pipefail

# The shell shim, from the `ckpt` that runs this script (or the one on PATH).
# shellcheck source=../../shims/ckpt/ckpt.sh
source "$("${CKPT_BIN:-ckpt}" shell-shim --path)"

steps=${TRAIN_STEPS:-10}
fail_at=${TRAIN_FAIL_AT:-$((steps / 2 + 1))}
delay=${TRAIN_DELAY:-0.1}
attempt=$(ckpt_attempt)

step=0 total=0
if state=$(ckpt_read); then
    read -r step total <<<"$state"
fi
echo "attempt $attempt: starting at step $((step + 1)) (restored snapshot: $(ckpt_restored || echo none))"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ckpt_on_preemption 'echo "checkpoint signal: the state is saved after every step"'

for ((step = step + 1; step <= steps; step++)); do
    if [[ "$attempt" == 1 && "$step" == "$fail_at" ]]; then
        ckpt_retry "step $step: simulated spot-instance hiccup, asking for a retry"
    fi
    sleep "$delay" # the "work"
    total=$((total + step * step))
    if ((step % 3 == 0)); then
        echo "weights after step $step: $total" >"$work/model.txt"
        ckpt_save "$work/model.txt"
    fi
    echo "$step $total" | ckpt_write # atomic, then committed: durable when it returns
    echo "step $step: total $total"
done

echo "done: $steps steps, total $total"
