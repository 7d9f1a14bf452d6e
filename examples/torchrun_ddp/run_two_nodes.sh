#!/bin/bash
# Two "nodes" of one torchrun job on this machine, each under its own
# `ckpt run`, sharing one remote: train, stop both nodes half-way (SIGTERM, as
# a scheduler ending the job sends it), then start two replacement nodes with
# empty local directories and print the step each one resumed at.
#
#   examples/torchrun_ddp/run_two_nodes.sh [WORKDIR]     (default: ./torchrun-demo)
#
# Needs `ckpt` and `torchrun` (torch, the CPU build is enough) on PATH.
# Every connection goes to 127.0.0.1. Knobs: STEPS, SAVE_EVERY, STEP_DELAY.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:-torchrun-demo}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
remote="file://$work/remote"
export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
export STEPS="${STEPS:-60}" SAVE_EVERY="${SAVE_EVERY:-5}"

pids=()
stop_all() {
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop_all EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_nodes NAME: both nodes in the background, each in $work/NAME/nodeR
# (its --dir is nodeR/ckpt there, its output nodeR.log), one new port.
start_nodes() {
  local name=$1 port rank
  port=$(free_port)
  pids=()
  for rank in 0 1; do
    mkdir -p "$work/$name/node$rank"
    (
      cd "$work/$name/node$rank"
      exec ckpt run --rank "$rank" --world-size 2 --retries 3 --retry-on 1,75,signals \
        --grace 20 --dir ckpt --remote "$remote" -- \
        torchrun --nnodes 2 --node_rank "$rank" --nproc-per-node 1 \
        --master_addr 127.0.0.1 --master_port "$port" "$here/train.py"
    ) >"$work/$name/node$rank.log" 2>&1 &
    pids+=("$!")
  done
}

# wait_nodes: wait for both, print their exit statuses.
wait_nodes() {
  local rank status
  for rank in 0 1; do
    status=0
    wait "${pids[$rank]}" || status=$?
    echo "  node $rank: ckpt run exited $status"
  done
  pids=()
}

committed() {  # committed LOG: the newest step the node's worker saw committed (0: none)
  { grep -o 'committed step [0-9]*' "$1" || true; } | awk '{s = $3} END {print s + 0}'
}

echo "run 1: two nodes, stopped once both have committed step $((2 * SAVE_EVERY)) (logs in $work/run1)"
STEP_DELAY="${STEP_DELAY:-0.2}" start_nodes run1
for _ in $(seq 600); do
  if (($(committed "$work/run1/node0.log") >= 2 * SAVE_EVERY)) &&
    (($(committed "$work/run1/node1.log") >= 2 * SAVE_EVERY)); then
    break
  fi
  if ! kill -0 "${pids[@]}" 2>/dev/null; then
    echo "a node ended early; its log says why:"
    wait_nodes
    exit 1
  fi
  sleep 0.5
done
kill -TERM "${pids[@]}"
wait_nodes
for rank in 0 1; do
  echo "  node $rank committed up to step $(committed "$work/run1/node$rank.log")"
done

echo "run 2: two replacement nodes with empty local dirs (logs in $work/run2)"
STEP_DELAY=0 start_nodes run2
wait_nodes
for rank in 0 1; do
  grep -h -e 'resumed at step' -e 'done at step' "$work/run2/node$rank.log" | sed 's/^/  /'
done
