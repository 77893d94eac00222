from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smolcandle  # noqa: E402
from models import ROOT, fixture, smollm2_path  # noqa: E402

DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def smollm2() -> smolcandle.Model:
    """The real SmolLM2-135M-Instruct (Q4_1), shared by the tests that only read from it."""
    model = smolcandle.Model.load(smollm2_path(), n_threads=2, n_ctx=2048)
    yield model
    model.close()


@pytest.fixture(scope="session")
def smollm2_refs() -> dict:
    return json.loads((DATA / "smollm2_llamacpp.json").read_text())


@pytest.fixture(scope="session")
def fixture_refs() -> dict:
    return json.loads((DATA / "fixtures_llamacpp.json").read_text())


@pytest.fixture(scope="session")
def fixture_path():
    return fixture


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The path of the real SmolLM2-135M GGUF, for tests that load it with their own settings."""
    return smollm2_path()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """``smolcandle serve`` with the real SmolLM2-135M, greedy, on a free loopback port."""
    from server import Server

    srv = Server(smollm2_path(), tmp_path_factory.mktemp("serve"), "--temperature", "0", "--max-tokens", "160", "--system", "You are a helpful assistant.")
    yield srv
    srv.stop()
