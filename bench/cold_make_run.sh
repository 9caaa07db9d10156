#!/usr/bin/env bash
# Cold `make run` on a fresh clone, to a dashboard answering /healthz, against a baseline
# commit in the same run (interleaved rounds, so load from other work hits both alike):
#
#   bench/cold_make_run.sh BASELINE_COMMIT [ROUNDS]     # e.g. bench/cold_make_run.sh 2bc070e 2
#
# Each round clones this repository twice (baseline, then HEAD) into a temp folder and runs
# `make run CONFIG=...` (server on a free port, data in the clone) until /healthz answers;
# prints the seconds, the .venv size and the lines printed before the agent's own. pip's
# cache is whatever this machine has (warm after the first run), for both sides alike.
set -euo pipefail
baseline=${1:?usage: $0 BASELINE_COMMIT [ROUNDS]}
rounds=${2:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
head=$(git -C "$repo" rev-parse --short HEAD)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "\$ bench/cold_make_run.sh $baseline $rounds   (HEAD $head, $(nproc) cpus)"
for round in $(seq 1 "$rounds"); do
  for commit in "$baseline" "$head"; do
    dir="$work/$commit-$round"
    git clone -q "$repo" "$dir" && git -C "$dir" checkout -q "$commit"
    p=$(port)
    printf '[agent]\ndata_dir = "%s/data"\n[server]\nport = %s\n[sources.system]\n' "$dir" "$p" > "$dir/bench.toml"
    load=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s.%N)
    (cd "$dir" && exec make run CONFIG="$dir/bench.toml" > "$dir/make-run.log" 2>&1) &
    pid=$!
    until curl -sf "http://127.0.0.1:$p/healthz" > /dev/null 2>&1; do
      kill -0 "$pid" 2>/dev/null || { echo "make run exited: $dir/make-run.log"; tail -5 "$dir/make-run.log"; exit 1; }
      sleep 0.1
    done
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    lines=$(grep -n "running as" "$dir/make-run.log" | head -1 | cut -d: -f1)
    printf 'round %d  %-8s %6.1f s  .venv %4s MB  %4s lines before the agent is up  (load %s)\n' \
      "$round" "$commit" "$secs" "$(du -sm "$dir/.venv" | cut -f1)" "$lines" "$load"
    pkill -TERM -P "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
done
