"""The model store and `smolcandle models pull` with the real huggingface_hub client against a
Hub on loopback (tests/fake_hub.py): a good download, a corrupted one and an interrupted one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from smolcandle import store

CLI = [sys.executable, "-m", "smolcandle"]
REPO, FILE = "ggml-org/SmolLM3-3B-GGUF", "SmolLM3-3B-Q4_K_M.gguf"


def run_cli(args: list[str], home: Path, endpoint: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOLCANDLE_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home / "hf")}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([*CLI, *args], check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=home)


@pytest.fixture()
def gguf_bytes(fixture_path) -> bytes:
    return fixture_path("gqa-q8_0").read_bytes()


def leftovers(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.rglob("*")) if models.exists() else []


def test_pull_good_download(tmp_path, gguf_bytes):
    with FakeHub(REPO, FILE, gguf_bytes) as hub:
        r = run_cli(["models", "pull", "smollm3-3b", "--quiet"], tmp_path, hub.url)
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "models" / FILE
    assert r.stdout.strip() == str(dest)
    assert dest.read_bytes() == gguf_bytes
    assert leftovers(tmp_path) == [FILE]
    listed = run_cli(["models", "list"], tmp_path)
    assert "smollm3-3b" in listed.stdout and str(dest) in listed.stdout
    assert run_cli(["models", "path", "smollm3-3b"], tmp_path).stdout.strip() == str(dest)
    # The default model is now SmolLM3-3B, and info reads it by name.
    info = run_cli(["info", "smollm3-3b"], tmp_path)
    assert info.returncode == 0 and "smollm3" in info.stdout and "Q8_0" in info.stdout
    assert run_cli(["models", "rm", "smollm3-3b"], tmp_path).returncode == 0
    assert leftovers(tmp_path) == []


def test_pull_corrupted_download_keeps_nothing(tmp_path, gguf_bytes):
    with FakeHub(REPO, FILE, gguf_bytes, mode="corrupt") as hub:
        r = run_cli(["models", "pull", "smollm3-3b", "--quiet"], tmp_path, hub.url)
    assert r.returncode == 1
    assert "checksum mismatch" in r.stderr
    assert leftovers(tmp_path) == []
    assert "not downloaded" in run_cli(["models", "list"], tmp_path).stdout


def test_pull_interrupted_download_keeps_nothing(tmp_path, gguf_bytes):
    with FakeHub(REPO, FILE, gguf_bytes, mode="interrupted") as hub:
        r = run_cli(["models", "pull", "smollm3-3b", "--quiet"], tmp_path, hub.url)
    assert r.returncode == 1, r.stdout
    assert "broke off, nothing was kept" in r.stderr
    assert leftovers(tmp_path) == []
    assert "not downloaded" in run_cli(["models", "list"], tmp_path).stdout


def test_pull_offline_says_so(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli(["models", "pull", "smollm3-3b", "--quiet"], tmp_path, f"http://127.0.0.1:{port}")
    assert r.returncode == 1
    assert "offline" in r.stderr
    assert leftovers(tmp_path) == []


def test_names_and_paths(tmp_path, monkeypatch, fixture_path):
    monkeypatch.setenv("SMOLCANDLE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(store.ModelNotFoundError, match="models pull smollm3-3b"):
        store.resolve("smollm3-3b")
    with pytest.raises(store.ModelNotFoundError, match="no model file"):
        store.resolve("nope")
    (tmp_path / "models").mkdir()
    local = tmp_path / "models" / "mine.gguf"
    local.write_bytes(fixture_path("gqa-q8_0").read_bytes())
    (tmp_path / "models" / "half.gguf.part").write_bytes(b"GGUF")
    assert store.resolve("mine") == local and store.resolve(str(local)) == local
    assert [m.name for m in store.list_models()] == ["mine"]


def test_remove_touches_only_gguf_files_in_the_store(tmp_path, monkeypatch, fixture_path):
    home = tmp_path / "home"
    monkeypatch.setenv("SMOLCANDLE_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (home / "models").mkdir(parents=True)
    kept = {name: tmp_path / name for name in ("outside.gguf", "notes.txt")}
    for p in kept.values():
        p.write_bytes(b"GGUF data")
    (home / "models" / "notes").write_bytes(b"not a model")
    for name in ("../../outside.gguf", "../../outside", str(kept["outside.gguf"]), "../../notes.txt", "notes", "..", ".gguf"):
        with pytest.raises(store.ModelNotFoundError):
            store.remove(name)
    assert all(p.exists() for p in kept.values()) and (home / "models" / "notes").exists()
    r = run_cli(["models", "rm", "../../outside.gguf"], home)
    assert r.returncode == 1 and "not in the store" in r.stderr and kept["outside.gguf"].exists()
    mine = home / "models" / "mine.gguf"
    mine.write_bytes(fixture_path("gqa-q8_0").read_bytes())
    assert store.remove("mine") == mine and not mine.exists()
