#!/usr/bin/env bash
# Usage: scripts/perf-table.sh [ROUNDS] [MODEL_ALIAS...]
# Our engine and llama.cpp, back to back on this machine, ROUNDS times round (default 3):
# the anchor workload at 1 thread and at all cores, and 8 streams batched, for each model
# (default: both catalogue models). One JSON line per run on stdout, tagged with the round;
# docs/performance.md takes the medians. Build first: cargo build --release.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
rounds="${1:-3}"
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m-instruct gemma3-270m)
target="${CARGO_TARGET_DIR:-$here/target}"
tessera="$target/release/tessera"
[ -x "$tessera" ] || { echo "build first: cargo build --release" >&2; exit 1; }
cache="${TESSERA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}/models"
bench="$here/../shared/bench"
[ -d "$bench" ] || bench="${TESSERA_BENCH_DIR:?set TESSERA_BENCH_DIR to the anchors (shared/bench)}"
cores="$(nproc)"
file_of() {
  case "$1" in
    smollm2-135m-instruct) echo "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    gemma3-270m) echo "$cache/gemma-3-270m-q4_k_m.gguf" ;;
    *) echo "$1" ;;
  esac
}
tag() { sed -e "s/^{/{\"round\":$1,\"model_alias\":\"$2\",/"; }
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $cores cores" >&2
for r in $(seq 1 "$rounds"); do
  for m in "${models[@]}"; do
    f="$(file_of "$m")"
    for t in 1 "$cores"; do
      "$tessera" --threads "$t" bench --model "$m" | tag "$r" "$m"
      "$bench/llamacpp-anchor.sh" "$f" 128 "$t" | tail -1 | tag "$r" "$m"
    done
    "$tessera" bench --model "$m" --streams 8 | tag "$r" "$m"
    "$bench/batch-anchor.sh" "$f" 8 | tail -1 | tag "$r" "$m"
  done
done
