#!/usr/bin/env bash
# Runs the portable wheel on CPUs without AVX-512 and without AVX2, emulated by Debian's
# qemu-user, and on this one: each run loads the demo model and greedy-generates 16 tokens
# (scripts/greedy_tokens.py), printing the kernels it chose and its tokens. An emulated CPU that
# lacks an instruction a build uses would end in SIGILL.
#
#   bash scripts/check_cpus.sh PYTHON MODEL.gguf [CPU ...]   (default CPUs: Haswell Nehalem)
#
# PYTHON is an interpreter with the portable wheel installed.
set -euo pipefail
PY="$1"; MODEL="$2"; shift 2
CPUS=("${@:-Haswell Nehalem}")
HERE="$(cd "$(dirname "$0")" && pwd)"
command -v qemu-x86_64 >/dev/null || { echo "check_cpus.sh: qemu-x86_64 is needed (apt-get install qemu-user)" >&2; exit 1; }
echo "== this CPU"
"$PY" "$HERE/greedy_tokens.py" "$MODEL"
for cpu in ${CPUS[@]}; do
    echo "== qemu-x86_64 -cpu $cpu"
    start=$(date +%s)
    qemu-x86_64 -cpu "$cpu" "$PY" "$HERE/greedy_tokens.py" "$MODEL"
    echo "($(( $(date +%s) - start )) s under emulation)"
done
