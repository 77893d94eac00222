"""The installed wheel as users get it: a fresh virtual environment with no Rust toolchain
installs it and runs the README's Python example; a portable wheel's builds (AVX-512, AVX2,
plain x86-64) each load on this machine and generate what the best one generates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import smolcandle

from models import ROOT, smollm2_path

PORTABLE = smolcandle.build_info()["builds"] == ["avx512", "avx2", "scalar"]
needs_portable = pytest.mark.skipif(not PORTABLE, reason="smolcandle is installed from a local build, not the portable wheel (scripts/build_wheel.sh)")

GREEDY = ROOT / "scripts" / "greedy_tokens.py"


def _wheel() -> Path:
    cache = Path(os.environ.get("SMOLCANDLE_CACHE", Path.home() / ".cache" / "smolcandle"))
    wheels = sorted((cache / "wheelhouse").glob("smolcandle-*.whl"))
    if not wheels:
        pytest.skip("no portable wheel in the wheelhouse (scripts/build_wheel.sh makes it)")
    return wheels[-1]


@needs_portable
def test_a_fresh_environment_without_rust_installs_the_wheel_and_runs_the_readme(tmp_path):
    wheel = _wheel()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # No cargo or rustc on PATH: only the venv and the system's basic tools.
    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": os.environ.get("HOME", str(tmp_path)), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    started = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], check=True, env=env, timeout=600)
    print(f"installed {wheel.name} into a fresh environment in {time.perf_counter() - started:.1f} s")
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    example = example.replace('"SmolLM3-3B-Q4_K_M.gguf"', repr(str(smollm2_path())))
    r = subprocess.run([str(venv / "bin" / "python"), "-c", example], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "ChatDone" in r.stdout and "Paris" in r.stdout
    v = subprocess.run([str(venv / "bin" / "smolcandle"), "--version"], capture_output=True, text=True, env=env, check=True).stdout
    v = " ".join(v.split())  # argparse wraps it to the terminal's width
    assert re.match(r"smolcandle \S+ \((avx512|avx2|scalar) kernels; this CPU offers .*; builds installed: avx512, avx2, scalar\)", v), v


@needs_portable
def test_every_build_runs_here_and_generates_the_same(tmp_path):
    """The builds this CPU can run, each forced with SMOLCANDLE_SIMD, greedy-generate the demo
    model's 16 tokens alike, or part where the top two logits were within 0.2 of each other."""
    import json

    offered = smolcandle.build_info()["cpu"]
    runs = {}
    for level in offered:
        env = {**os.environ, "SMOLCANDLE_SIMD": level}
        r = subprocess.run([sys.executable, str(GREEDY), str(smollm2_path())], capture_output=True, text=True, env=env, timeout=600, check=False)
        assert r.returncode == 0, r.stderr
        runs[level] = json.loads(r.stdout)
        assert runs[level]["build"]["simd"] == level
    # Nothing falls back to scalar code where the CPU has SIMD: each build is compiled with
    # the features its kernels and Candle's need.
    needs = {"avx512": {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, "avx2": {"avx", "avx2", "fma", "f16c"}, "scalar": set()}
    for level, run in runs.items():
        assert needs[level] <= set(run["build"]["target_features"]), (level, run["build"])
    best = runs[offered[0]]
    for level, run in runs.items():
        for i, (a, b) in enumerate(zip(best["tokens"], run["tokens"])):
            if a != b:
                assert min(best["margins"][i], run["margins"][i]) < 0.2, f"{level} parts from {offered[0]} at token {i} without a near-tie"
                break
    # A level the CPU lacks is refused at import with a message, never run.
    missing = [lv for lv in ("avx512", "avx2") if lv not in offered]
    for level in missing:
        r = subprocess.run([sys.executable, "-c", "import smolcandle"], capture_output=True, text=True, env={**os.environ, "SMOLCANDLE_SIMD": level}, check=False)
        assert r.returncode != 0 and "this CPU offers only" in r.stderr
