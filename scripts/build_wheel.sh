#!/usr/bin/env bash
# Builds the portable wheel into OUTDIR (default dist/): one wheel that installs without a Rust
# toolchain on any x86-64 Linux with glibc 2.17 or newer (manylinux2014, linked with zig) and
# runs the best kernels the CPU has. Candle's quantized kernels choose their SIMD when they are
# compiled, as ours do, so the native module is compiled three times, for AVX-512 (x86-64-v4
# with VNNI), AVX2 (x86-64-v3) and plain x86-64, and python/smolcandle/_native.py loads the
# best one the CPU runs (CPUID) at import. `auditwheel show` checks the tag.
#
#   bash scripts/build_wheel.sh [OUTDIR]
#   bash scripts/build_wheel.sh --native [OUTDIR]
#
# --native builds one module instead, for the CPU of the machine that builds it
# (.cargo/config.toml's target-cpu=native: the best level it runs, compiled once), in a wheel
# for this machine only: what scripts/run.sh installs.
#
# Build outputs are kept per level under $SMOLCANDLE_CACHE (default ~/.cache/smolcandle), so a
# second build only recompiles what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
NATIVE=""
if [ "${1:-}" = "--native" ]; then NATIVE=1; shift; fi
OUT="$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)"
CACHE="${SMOLCANDLE_CACHE:-$HOME/.cache/smolcandle}"
VENV="$CACHE/venv-build"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "maturin>=1.7,<2" "ziglang>=0.13" "auditwheel>=6" "wheel>=0.42"

# What the wheel is built from: when it has not changed since the wheel in OUTDIR was built,
# that wheel is kept (a second run takes seconds).
SOURCES=(rust python web Cargo.toml Cargo.lock pyproject.toml README.md .cargo scripts/build_wheel.sh)
DIGEST="$( (echo "native=$NATIVE"; git ls-files -s -- "${SOURCES[@]}"; git diff HEAD -- "${SOURCES[@]}"
            git ls-files -o --exclude-standard -z -- "${SOURCES[@]}" | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/.source-sha256" ] && [ "$(cat "$OUT/.source-sha256")" = "$DIGEST" ] && ls "$OUT"/smolcandle-*.whl >/dev/null 2>&1; then
    echo "== the wheel in $OUT is up to date"
    ls "$OUT"/smolcandle-*.whl
    exit 0
fi

if [ -n "$NATIVE" ]; then
    echo "== building the native module for this CPU (target-cpu=native)"
    rm -f "$OUT"/smolcandle-*.whl "$OUT/.source-sha256"
    PATH="$VENV/bin:$PATH" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}" "$VENV/bin/maturin" build --release --quiet -o "$OUT"
    echo "$DIGEST" > "$OUT/.source-sha256"
    ls -l "$OUT"/smolcandle-*.whl
    exit 0
fi

declare -A FLAGS=(
    [avx512]="-C target-cpu=x86-64-v4 -C target-feature=+avx512vnni"
    [avx2]="-C target-cpu=x86-64-v3"
    [scalar]="-C target-cpu=x86-64"
)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
for level in scalar avx2 avx512; do
    echo "== building the $level module (RUSTFLAGS: ${FLAGS[$level]})"
    # RUSTFLAGS replaces .cargo/config.toml's target-cpu=native, which is for local builds only;
    # maturin finds zig through the build environment's python (the ziglang package).
    PATH="$VENV/bin:$PATH" RUSTFLAGS="${FLAGS[$level]}" CARGO_TARGET_DIR="$CACHE/target-wheel-$level" \
        "$VENV/bin/maturin" build --release --zig --compatibility manylinux2014 --quiet -o "$WORK/$level"
done

echo "== assembling one wheel with the three modules"
"$VENV/bin/python" -m wheel unpack --dest "$WORK/unpacked" "$WORK"/scalar/*.whl
ROOT="$(echo "$WORK"/unpacked/*)"
for level in scalar avx2 avx512; do
    "$VENV/bin/python" - "$WORK/$level" "$ROOT/smolcandle/_native_$level.abi3.so" <<'PY'
import pathlib, sys, zipfile
(wheel,) = pathlib.Path(sys.argv[1]).glob("*.whl")
with zipfile.ZipFile(wheel) as z:
    pathlib.Path(sys.argv[2]).write_bytes(z.read("smolcandle/_native.abi3.so"))
PY
done
rm "$ROOT/smolcandle/_native.abi3.so"
rm -f "$OUT"/smolcandle-*.whl "$OUT/.source-sha256"
"$VENV/bin/python" -m wheel pack --dest-dir "$OUT" "$ROOT"
echo "$DIGEST" > "$OUT/.source-sha256"
"$VENV/bin/auditwheel" show "$OUT"/smolcandle-*.whl
ls -l "$OUT"/smolcandle-*.whl
