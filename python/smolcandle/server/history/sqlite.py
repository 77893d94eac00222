"""The history in one SQLite file (the default, for one server).

All writes and page reads go through one connection owned by one worker thread, so the event loop
never waits on the disk and SQLite never sees two threads on a connection. Searches (FTS5, whose
tokenizer folds accents) run on connections of their own, on their own two threads, each
interrupted once it has run for :data:`~smolcandle.server.limits.SEARCH_SECONDS` since it was
asked for (waiting included), so no query can hold up a page load or a shutdown. The schema's
version is SQLite's ``user_version``.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .. import limits
from .interface import SearchError, SearchHit, search_words
from .sql import Args, SqlHistory, Statements

T = TypeVar("T")

_memory_ids = itertools.count()

PRAGMAS = "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;"

# The schema, version by version: a database at version N gets N+1… applied at start, each in
# one transaction. (Version 1 is written with IF NOT EXISTS: it is also the schema of databases
# from before versions were counted.)
MIGRATIONS: list[str] = [
    """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    session TEXT NOT NULL,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_session ON conversations (session, updated DESC);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    finish_reason TEXT,
    completion_tokens INTEGER,
    tokens_per_second REAL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5 (
    content, content = 'messages', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_au AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
""",
    # The Responses API's stored responses.
    """
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    chain TEXT NOT NULL,
    conversation TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX responses_by_owner ON responses (owner, created);
""",
]


def _fts_query(text: str) -> str:
    """User text as an FTS5 query: each word a quoted prefix term."""
    return " ".join('"{}"*'.format(w.replace('"', '""')) for w in search_words(text))


class SqliteHistory(SqlHistory):
    """The history in one SQLite file (``":memory:"``: in memory, kept by nothing). Nothing is
    opened before :meth:`start`."""

    sql = Statements()

    def __init__(self, path: str | Path, *, unfinished_are_interrupted: bool = True) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self._uri = self.path.resolve().as_uri()
        else:  # shared between this history's connections, and nothing else
            self._uri = f"file:smolcandle-history-{next(_memory_ids)}?mode=memory&cache=shared"
        self._unfinished_are_interrupted = unfinished_are_interrupted
        self._executor: ThreadPoolExecutor | None = None
        self._searches: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self.schema_version = 0

    async def start(self) -> None:
        """Opens the file (creating its folder), and brings its schema to the current version."""
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolcandle-history")
        self._searches = ThreadPoolExecutor(max_workers=2, thread_name_prefix="smolcandle-search")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self._uri, uri=True, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.executescript(PRAGMAS)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.executescript(f"BEGIN; {script}; PRAGMA user_version = {n}; COMMIT;")
        if self._unfinished_are_interrupted:
            db.execute(self.sql.interrupt_unfinished)
        self.schema_version = max(version, len(MIGRATIONS))
        self._db = db

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_now)

    def close_now(self) -> None:
        """Closes the history from outside the event loop (a no-op if it was never started)."""
        executor, searches = self._executor, self._searches
        if executor is None or searches is None:
            return
        self._executor = self._searches = None

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        searches.shutdown(cancel_futures=True)  # a running one ends by its deadline
        executor.submit(close).result()
        executor.shutdown()

    # -- the primitives of SqlHistory, each one trip to the worker thread -----------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._open_executor(self._executor), self._call, fn)

    @staticmethod
    def _open_executor(executor: ThreadPoolExecutor | None) -> ThreadPoolExecutor:
        if executor is None:
            raise RuntimeError("the history is not open (start() opens it)")
        return executor

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None
        return fn(self._db)

    async def _rows(self, sql: str, args: Args) -> list[dict[str, Any]]:
        return await self._run(lambda db: [dict(r) for r in db.execute(sql, args)])

    async def _row(self, sql: str, args: Args) -> dict[str, Any] | None:
        def q(db: sqlite3.Connection) -> dict[str, Any] | None:
            r = db.execute(sql, args).fetchone()
            return dict(r) if r else None

        return await self._run(q)

    async def _changed(self, sql: str, args: Args) -> int:
        return await self._run(lambda db: db.execute(sql, args).rowcount)

    async def _insert(self, sql: str, args: Args) -> int:
        return await self._run(lambda db: int(db.execute(sql, args).lastrowid or 0))

    async def _insert_then(self, inserts: Sequence[tuple[str, Args]], then: tuple[str, Args]) -> list[int]:
        def q(db: sqlite3.Connection) -> list[int]:
            with db:
                db.execute("BEGIN")
                ids = [int(db.execute(sql, args).lastrowid or 0) for sql, args in inserts]
                db.execute(*then)
            return ids

        return await self._run(q)

    # -- search -------------------------------------------------------------------------------

    async def search(self, session: str, text: str, limit: int = 20) -> list[SearchHit]:
        query = _fts_query(text)
        if not query:
            return []
        seconds = limits.SEARCH_SECONDS
        deadline = time.monotonic() + seconds
        searches = self._open_executor(self._searches)

        def q() -> list[SearchHit]:
            if time.monotonic() >= deadline:
                raise SearchError("the search waited too long behind others; try again")
            db = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            try:
                # Called every 1000 virtual machine steps: a non-zero answer interrupts the query.
                db.set_progress_handler(lambda: time.monotonic() >= deadline, 1000)
                db.execute("PRAGMA query_only = ON")
                rows = db.execute(
                    "SELECT c.id, c.title, m.id, m.role, snippet(messages_fts, 0, char(2), char(3), '…', 12)"
                    " FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
                    " JOIN conversations c ON c.id = m.conversation_id"
                    " WHERE messages_fts MATCH ? AND c.session = ? ORDER BY rank LIMIT ?",
                    (query, session, limit),
                ).fetchall()
            except sqlite3.OperationalError as e:
                if "interrupted" in str(e):
                    raise SearchError(f"the search took longer than {seconds:g} s; try fewer or longer words") from None
                if "locked" in str(e):  # an in-memory history being written: its tables lock
                    raise SearchError("the history is busy; try again") from None
                raise
            finally:
                db.close()
            return [SearchHit(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await asyncio.get_running_loop().run_in_executor(searches, q)
