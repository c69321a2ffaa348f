#!/usr/bin/env bash
# Installs the pinned Solidity compiler (npm package solc, contracts/package-lock.json)
# and, with --compile, rebuilds contracts/artifacts from contracts/src.
# The artifacts are committed; tests check that compiling again reproduces them.
set -euo pipefail
cd "$(dirname "$0")/../contracts"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "contracts.sh: node and npm are needed (apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
if [ ! -f node_modules/solc/package.json ] || ! grep -q '"version": "0.8.37"' node_modules/solc/package.json; then
  if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; else npm install --no-audit --no-fund --loglevel=error; fi
fi
if [ "${1:-}" = "--compile" ]; then
  node compile.mjs
fi
