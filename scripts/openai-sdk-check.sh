#!/usr/bin/env bash
# Runs scripts/openai_sdk_check.py against a running Tessera API with the official OpenAI
# Python SDK, installed once (pinned) into a virtualenv in the cache.
#   scripts/openai-sdk-check.sh BASE_URL API_KEY [MODEL]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${TESSERA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}"
version="3.57.0"
venv="$cache/venv-openai-$version"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  echo "installing the OpenAI Python SDK $version into $venv (once)" >&2
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check "openai==$version" >&2
  rm -rf "$venv"
  # Only bin/python is used, and it finds the venv from its own location: moving is safe.
  mv "$venv.tmp" "$venv"
fi
exec "$venv/bin/python" "$here/openai_sdk_check.py" "$@"
