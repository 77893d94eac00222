"""Chooses the build of the native module that the CPU runs best.

A wheel built from source on the machine that runs it holds one module, ``_native.abi3.so``,
which Python imports before this file. The portable wheel (scripts/build_wheel.sh) holds the
module compiled three times instead, ``_native_avx512``, ``_native_avx2`` and
``_native_scalar``, because Candle's quantized kernels, like ours, pick their SIMD when they
are compiled. Then this file is imported: it loads the plain x86-64 build (which runs on any
x86-64 CPU), asks it what the CPU offers (CPUID), and loads the best build the CPU can run,
under this module's name. ``SMOLCANDLE_SIMD=avx2`` (or ``avx512``, ``scalar``) picks one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

_LEVELS = ("avx512", "avx2", "scalar")


def _load(path: Path) -> ModuleType:
    # The module's initialisation function is named after the last part of the name given
    # here (PyInit__native), whatever the file is called.
    loader = importlib.machinery.ExtensionFileLoader(__name__, str(path))
    spec = importlib.util.spec_from_file_location(__name__, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _choose() -> ModuleType:
    here = Path(__file__).parent
    builds = {level: p for level in _LEVELS for p in here.glob(f"_native_{level}.*so")}
    if "scalar" not in builds:
        raise ImportError(f"smolcandle's native module is missing from {here} (reinstall smolcandle)")
    probe = _load(builds["scalar"])
    offered = list(probe.BUILD["cpu"])
    wanted = os.environ.get("SMOLCANDLE_SIMD")
    if wanted:
        if wanted not in builds:
            raise ImportError(f"SMOLCANDLE_SIMD={wanted}: this wheel has builds for {', '.join(builds)}")
        if wanted not in offered:
            raise ImportError(f"SMOLCANDLE_SIMD={wanted}: this CPU offers only {', '.join(offered)}")
        level = wanted
    else:
        level = next(lv for lv in _LEVELS if lv in builds and lv in offered)
    module = probe if level == "scalar" else _load(builds[level])
    module.BUILD["builds"] = [lv for lv in _LEVELS if lv in builds]
    return module


sys.modules[__name__] = _choose()
