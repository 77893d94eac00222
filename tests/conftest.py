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


# -- real database and Redis servers, started by the PyPI fixtures from Debian's binaries ---------

from pytest_postgresql import factories as postgresql_factories  # noqa: E402
from pytest_redis import factories as redis_factories  # noqa: E402

# PostgreSQL refuses to run as root; tests/bin/pg_ctl runs Debian's as `postgres` when need be.
postgresql_proc = postgresql_factories.postgresql_proc(executable=str(ROOT / "tests" / "bin" / "pg_ctl"))
postgresql = postgresql_factories.postgresql("postgresql_proc")
redis_proc = redis_factories.redis_proc(executable="/usr/bin/redis-server")
redisdb = redis_factories.redisdb("redis_proc")
# A second server, which a test may stop and start again.
redis_restartable = redis_factories.redis_proc(executable="/usr/bin/redis-server")


@pytest.fixture(scope="session")
def redis_server(redis_proc):
    """The tests' redis-server, with Redis' default of never closing idle clients (pytest-redis
    sets a timeout, and cannot be told 0), which the server's connection pool relies on."""
    import redis

    with redis.Redis(host=redis_proc.host, port=redis_proc.port) as r:
        r.config_set("timeout", 0)
    return redis_proc


@pytest.fixture
def postgres_url(postgresql) -> str:
    """A fresh, empty PostgreSQL database (dropped after the test)."""
    i = postgresql.info
    return f"postgresql://{i.user}@{i.host}:{i.port}/{i.dbname}"


@pytest.fixture
def redis_url(redis_server, redisdb) -> str:
    """A Redis server, emptied after the test."""
    return f"redis://{redis_server.host}:{redis_server.port}/0"


@pytest.fixture(params=["sqlite", "postgresql"])
def history_target(request, tmp_path) -> str:
    """Where a history lives: an SQLite file, then a PostgreSQL database (the same tests run on both)."""
    if request.param == "sqlite":
        return str(tmp_path / "history.sqlite3")
    return request.getfixturevalue("postgres_url")
