"""The conversation history in PostgreSQL, which replicas of the server share.

The same :class:`~.interface.HistoryStore` as SQLite's, on psycopg 3's asyncio connections from a
pool that :meth:`~PostgresHistory.start` opens. Full-text search is PostgreSQL's own: each
message's ``tsvector`` is a stored generated column under a GIN index, the words of a search are
prefix terms (``'word':*``) of one ``tsquery``, ranked by ``ts_rank_cd`` and shown by
``ts_headline``. Accents are folded (``unaccent``), as SQLite's tokenizer folds them. Every search
runs under a ``statement_timeout``, on a pool connection it waited for at most as long.

The schema is versioned: ``schema_migrations`` lists the versions applied, and at start the
missing ones are applied in order, each in one transaction, under an advisory lock so that
replicas starting together apply each once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .. import limits
from .interface import SearchError, SearchHit, search_words
from .sql import Args, SqlHistory, Statements

# Version N is MIGRATIONS[N - 1].
MIGRATIONS: list[str] = [
    """
    CREATE EXTENSION IF NOT EXISTS unaccent;
    CREATE TEXT SEARCH CONFIGURATION smolcandle (COPY = simple);
    ALTER TEXT SEARCH CONFIGURATION smolcandle ALTER MAPPING FOR hword, hword_part, word WITH unaccent, simple;
    CREATE TABLE conversations (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session text NOT NULL,
        title text NOT NULL,
        created double precision NOT NULL,
        updated double precision NOT NULL
    );
    CREATE INDEX conversations_by_session ON conversations (session, updated DESC);
    CREATE TABLE messages (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content text NOT NULL DEFAULT '',
        reasoning text NOT NULL DEFAULT '',
        finish_reason text,
        completion_tokens integer,
        tokens_per_second double precision,
        created double precision NOT NULL,
        words tsvector GENERATED ALWAYS AS (to_tsvector('smolcandle', content)) STORED
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    CREATE INDEX messages_words ON messages USING GIN (words);
    """,
    # The Responses API's stored responses.
    """
    CREATE TABLE responses (
        id text PRIMARY KEY,
        owner text NOT NULL,
        chain text NOT NULL,
        conversation text NOT NULL,
        body text NOT NULL,
        created double precision NOT NULL
    );
    CREATE INDEX responses_by_owner ON responses (owner, created);
    """,
]

# The snippet: one fragment around the matches, marked as SQLite's snippet() marks them.
_HEADLINE = "StartSel=\x02, StopSel=\x03, MaxWords=16, MinWords=6, ShortWord=0, MaxFragments=1, FragmentDelimiter=…"


def _tsquery(words: list[str]) -> str:
    """Words as the text of a ``to_tsquery``: each a quoted lexeme, matched as a prefix."""
    return " & ".join("'{}':*".format(w.replace("\\", "\\\\").replace("'", "''")) for w in words)


def _import_psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool
        from psycopg.rows import dict_row
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError("a PostgreSQL history needs psycopg: pip install 'smolcandle[replicas]'") from None
    return psycopg, psycopg_pool, dict_row


class PostgresHistory(SqlHistory):
    """The history in the PostgreSQL database at ``url``. Nothing is opened before :meth:`start`."""

    sql = Statements().marked("%s")

    def __init__(self, url: str, *, unfinished_are_interrupted: bool = True, pool_size: int = 8) -> None:
        self.url = url
        self._unfinished_are_interrupted = unfinished_are_interrupted
        self._pool_size = pool_size
        self._pool: Any = None
        self.schema_version = 0

    async def start(self) -> None:
        """Opens the pool, and brings the schema to the current version."""
        psycopg, psycopg_pool, dict_row = _import_psycopg()
        self._cancelled: type[Exception] = psycopg.errors.QueryCanceled
        self._pool_timeout: type[Exception] = psycopg_pool.PoolTimeout
        self._pool = psycopg_pool.AsyncConnectionPool(
            self.url, min_size=1, max_size=self._pool_size, open=False, kwargs={"autocommit": True, "row_factory": dict_row}, name="smolcandle-history"
        )
        try:
            await self._pool.open(wait=True, timeout=10)
        except Exception as e:  # noqa: BLE001 - whatever the cause, one clear error at start
            await self._pool.close()
            raise RuntimeError(f"cannot reach PostgreSQL at {_redacted(self.url)}: {e}") from None
        await self._migrate()
        if self._unfinished_are_interrupted:
            await self._changed(self.sql.interrupt_unfinished, ())

    async def _migrate(self) -> None:
        async with self._pool.connection() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(hashtext('smolcandle schema'))")
            await db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied double precision NOT NULL)")
            cur = await db.execute("SELECT coalesce(max(version), 0) AS v FROM schema_migrations")
            version = (await cur.fetchone())["v"]
            for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
                async with db.transaction():
                    await db.execute(script)
                    await db.execute("INSERT INTO schema_migrations (version, applied) VALUES (%s, %s)", (n, time.time()))
            self.schema_version = max(version, len(MIGRATIONS))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    # -- the primitives of SqlHistory, each on a connection from the pool ---------------------

    async def _rows(self, sql: str, args: Args) -> list[dict[str, Any]]:
        async with self._pool.connection() as db:
            cur = await db.execute(sql, args)
            return await cur.fetchall()

    async def _row(self, sql: str, args: Args) -> dict[str, Any] | None:
        async with self._pool.connection() as db:
            cur = await db.execute(sql, args)
            return await cur.fetchone()

    async def _changed(self, sql: str, args: Args) -> int:
        async with self._pool.connection() as db:
            cur = await db.execute(sql, args)
            return cur.rowcount

    async def _insert(self, sql: str, args: Args) -> int:
        r = await self._row(sql + " RETURNING id", args)
        assert r is not None
        return int(r["id"])

    async def _insert_then(self, inserts: Sequence[tuple[str, Args]], then: tuple[str, Args]) -> list[int]:
        ids = []
        async with self._pool.connection() as db, db.transaction():
            for sql, args in inserts:
                r = await (await db.execute(sql + " RETURNING id", args)).fetchone()
                ids.append(int(r["id"]))
            await db.execute(*then)
        return ids

    # -- search -------------------------------------------------------------------------------

    async def search(self, session: str, text: str, limit: int = 20) -> list[SearchHit]:
        words = search_words(text)
        if not words:
            return []
        seconds = limits.SEARCH_SECONDS
        try:
            async with self._pool.connection(timeout=seconds) as db, db.transaction():
                await db.execute(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")
                cur = await db.execute(
                    "SELECT c.id AS cid, c.title, m.id AS mid, m.role, ts_headline('smolcandle', m.content, q, %s) AS snippet"
                    " FROM messages m JOIN conversations c ON c.id = m.conversation_id, to_tsquery('smolcandle', %s) q"
                    " WHERE m.words @@ q AND c.session = %s ORDER BY ts_rank_cd(m.words, q) DESC, m.id DESC LIMIT %s",
                    (_HEADLINE, _tsquery(words), session, limit),
                )
                rows = await cur.fetchall()
        except self._cancelled:
            raise SearchError(f"the search took longer than {seconds:g} s; try fewer or longer words") from None
        except self._pool_timeout:
            raise SearchError("the search waited too long behind others; try again") from None
        return [SearchHit(r["cid"], r["title"], r["mid"], r["role"], r["snippet"]) for r in rows]


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
