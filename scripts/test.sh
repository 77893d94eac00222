#!/usr/bin/env bash
# Builds the portable wheel, installs it with the test dependencies into a fresh virtual
# environment and runs the whole suite against it: Rust unit tests, then pytest (real
# SmolLM2-135M model, generated smollm3 fixtures).
# Build outputs, the venv and the test model are cached under $SMOLCANDLE_CACHE (outside the
# clone), so a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
VENV="$CACHE/venv-test"
mkdir -p "$CACHE"

command -v cargo >/dev/null || { echo "test.sh: cargo (Rust) is required" >&2; exit 1; }
# The browser tests drive Debian's Chromium (Playwright's own browser builds are not used); the
# replica tests start Debian's redis-server, PostgreSQL and nginx (the PyPI fixtures
# pytest-redis and pytest-postgresql start the first two).
need=()
command -v chromium >/dev/null || need+=(chromium fonts-dejavu-core)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql postgresql-contrib)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing Debian's ${need[*]} for the tests"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # policy-rc.d 101: install the servers without starting them (the tests start their own)
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null && $SUDO chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
echo "== building the portable wheel (the native module for AVX-512, AVX2 and plain x86-64; kept when unchanged)"
bash scripts/build_wheel.sh "$CACHE/wheelhouse"
WHEEL="$(ls "$CACHE"/wheelhouse/smolcandle-*.whl)"

echo "== installing it into a fresh virtual environment, as a user would"
python3 -m venv --clear "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$WHEEL[test]"
python -c "import smolcandle; print('smolcandle', smolcandle.__version__, smolcandle.build_info())"

echo "== Rust tests"
cargo test --release -p smolcandle-engine --quiet

# The native CPU runs only its best kernels: on an AVX-512 machine the AVX2 and scalar paths
# would never run. The engine's unit tests (every kernel against its scalar definition, batch
# invariance of each layout) again, compiled for AVX2 (x86-64-v3) and for plain x86-64.
for cpu in x86-64-v3 x86-64; do
    echo "== Rust unit tests compiled for $cpu"
    CARGO_TARGET_DIR="$CACHE/target-$cpu" RUSTFLAGS="-C target-cpu=$cpu" cargo test --release -p smolcandle-engine --lib --quiet
done

echo "== Import layers (the Python source, as pyproject's [tool.importlinter] states them)"
PYTHONPATH=python lint-imports --no-cache

echo "== Python tests"
# The package source lives in python/, not on sys.path: the tests import the installed wheel.
python -m pytest -q -p no:cacheprovider tests "$@"

if [ $# -eq 0 ] && python -c "import sys, smolcandle; sys.exit('avx2' not in smolcandle.build_info()['cpu'])"; then
    echo "== Batch invariance and speculative decoding with the wheel's AVX2 build"
    SMOLCANDLE_SIMD=avx2 python -m pytest -q -p no:cacheprovider tests/test_speculative.py \
        tests/test_generate.py -k "batched_steps or generated_tokens_state or plain_decoding or prefix_reuse"
fi
