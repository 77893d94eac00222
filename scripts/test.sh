#!/usr/bin/env bash
# Installs smolcandle with its test dependencies into a virtual environment and runs the whole
# suite: Rust unit tests, then pytest (real SmolLM2-135M model, generated smollm3 fixtures).
# Build outputs, the venv and the test model are cached under $SMOLCANDLE_CACHE (outside the
# clone), so a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv-test"
mkdir -p "$CACHE"

command -v cargo >/dev/null || { echo "test.sh: cargo (Rust) is required" >&2; exit 1; }
# The browser tests drive Debian's Chromium (Playwright's own browser builds are not used).
if ! command -v chromium >/dev/null; then
    echo "== installing Debian's chromium for the browser tests"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

echo "== installing smolcandle (release build; first run compiles Candle, several minutes)"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ".[test]"

echo "== Rust tests"
cargo test --release -p smolcandle-engine --quiet

echo "== Import layers (the Python source, as pyproject's [tool.importlinter] states them)"
PYTHONPATH=python lint-imports --no-cache

echo "== Python tests"
# The package source lives in python/, not on sys.path: the tests import the installed wheel.
python -m pytest -q -p no:cacheprovider tests "$@"
