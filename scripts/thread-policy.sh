#!/usr/bin/env bash
# Usage: scripts/thread-policy.sh [ROUNDS] [MODEL_ALIAS]
# The thread-policy measurement of docs/performance.md: our engine under each thread
# policy (one thread, the whole pool, adaptive), idle and beside a competing load (one process spinning on a core, as a node's own
# network and API, or anything else on the machine, may take one), ROUNDS times round
# (default 3). One JSON line per run on stdout, tagged with the load.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
rounds="${1:-3}"
model="${2:-smollm2-135m-instruct}"
tessera="${CARGO_TARGET_DIR:-$here/target}/release/tessera"
[ -x "$tessera" ] || { echo "build first: cargo build --release" >&2; exit 1; }
cores="$(nproc)"
run() { # load threads bench-args...
  local load="$1" t="$2"; shift 2
  "$tessera" --threads "$t" bench --model "$model" "$@" | sed -e "s/^{/{\"load\":\"$load\",/"
}
for r in $(seq 1 "$rounds"); do
  for p in one all adaptive; do run idle "$cores" --engine --thread-policy "$p"; done
  for p in one all adaptive; do run idle "$cores" --streams 8 --thread-policy "$p"; done
  sh -c 'while :; do :; done' &
  spinner=$!
  trap 'kill $spinner 2>/dev/null' EXIT
  for p in one all adaptive; do run busy "$cores" --engine --thread-policy "$p"; done
  for p in one all adaptive; do run busy "$cores" --streams 8 --thread-policy "$p"; done
  kill "$spinner"; wait "$spinner" 2>/dev/null || true
done
