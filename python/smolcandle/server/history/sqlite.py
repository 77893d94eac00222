"""Conversation history: conversations, their messages, and full-text search over them.

:class:`HistoryStore` is what the server asks of a history: :class:`SqliteHistory` (here, the
default) or :class:`~.history_pg.PostgresHistory`, which replicas share;
:func:`~.state.open_history` opens either from a path or a ``postgresql://`` URL. Conversations belong to the
browser session that made them; every read and write names the session.

In SQLite, all writes and page reads go through one connection owned by one worker thread, so the event
loop never waits on the disk and SQLite never sees two threads on a connection. Searches run on
connections of their own, on their own two threads, each interrupted once it has run for
``SEARCH_SECONDS`` since it was asked for (waiting included), so no query can hold up a page
load or a shutdown. The schema's version is SQLite's ``user_version``.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..._model import DEFAULTS

T = TypeVar("T")

SEARCH_SECONDS: float = DEFAULTS["search_seconds"]
_memory_ids = itertools.count()


class SearchError(ValueError):
    """A search that is too long, or that ran out of time; the message says which."""

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
]


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    title: str
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    reasoning: str
    finish_reason: str | None
    completion_tokens: int | None
    tokens_per_second: float | None

    def to_chat(self) -> dict[str, Any]:
        """The message as the model's chat template takes it (reasoning stays out)."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int
    role: str
    snippet: str  # plain text; the matched terms between \x02 and \x03


def _title_of(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return (line[: limit - 1] + "…") if len(line) > limit else (line or "New chat")


def search_words(text: str) -> list[str]:
    """The distinct words of a search, each to be matched as a word prefix, all required.
    Raises :class:`SearchError` past the limits of words and characters."""
    if len(text) > DEFAULTS["max_search_chars"]:
        raise SearchError(f"a search may hold at most {DEFAULTS['max_search_chars']} characters")
    words = list(dict.fromkeys(w for w in text.split() if w.strip()))
    if len(words) > DEFAULTS["max_search_terms"]:
        raise SearchError(f"a search may hold at most {DEFAULTS['max_search_terms']} words")
    return words


def _fts_query(text: str) -> str:
    """User text as an FTS5 query: each word a quoted prefix term."""
    return " ".join('"{}"*'.format(w.replace('"', '""')) for w in search_words(text))


class HistoryStore(Protocol):
    """What the server keeps of its conversations, on whichever database. Every method is a
    coroutine; none blocks the event loop."""

    async def start(self) -> None:
        """Connects, and brings the schema to the current version."""

    async def close(self) -> None: ...

    async def conversations(self, session: str) -> list[Conversation]: ...

    async def conversation(self, session: str, conversation_id: int) -> Conversation | None: ...

    async def create_conversation(self, session: str, first_message: str) -> Conversation: ...

    async def rename(self, session: str, conversation_id: int, title: str) -> bool: ...

    async def delete(self, session: str, conversation_id: int) -> bool: ...

    async def messages(self, session: str, conversation_id: int) -> list[Message]: ...

    async def add_exchange(self, conversation_id: int, user_text: str) -> tuple[int, int]:
        """Stores a user message and an empty assistant message to be filled in; their ids."""

    async def save_partial(self, message_id: int, *, content: str, reasoning: str) -> None:
        """Saves an answer still being written (its finish stays unset)."""

    async def finish_answer(
        self, message_id: int, *, content: str, reasoning: str, finish_reason: str, completion_tokens: int | None, tokens_per_second: float | None
    ) -> None: ...

    async def interrupt(self, message_id: int) -> bool:
        """Marks an answer whose writer died as interrupted, keeping what was saved of it;
        False if it had already finished."""

    async def search(self, session: str, text: str, limit: int = 20) -> list[SearchHit]:
        """The session's messages holding every word of ``text`` (as word prefixes), best
        first, each with a snippet whose matches are between \\x02 and \\x03. Raises
        :class:`SearchError` for a search past the limits or out of time (``SEARCH_SECONDS``)."""


class SqliteHistory:
    """The history in one SQLite file."""

    def __init__(self, path: str | Path, *, unfinished_are_interrupted: bool = True) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._uri = self.path.resolve().as_uri()
        else:  # shared between this history's connections, and nothing else
            self._uri = f"file:smolcandle-history-{next(_memory_ids)}?mode=memory&cache=shared"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolcandle-history")
        self._searches = ThreadPoolExecutor(max_workers=2, thread_name_prefix="smolcandle-search")
        self._db: sqlite3.Connection | None = None
        self._unfinished_are_interrupted = unfinished_are_interrupted
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        db = sqlite3.connect(self._uri, uri=True, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.executescript(PRAGMAS)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.executescript(f"BEGIN; {script}; PRAGMA user_version = {n}; COMMIT;")
        if self._unfinished_are_interrupted:
            # A message still generating when the server stopped keeps what it had, marked as such.
            db.execute("UPDATE messages SET finish_reason = 'interrupted' WHERE role = 'assistant' AND finish_reason IS NULL")
        self._db = db

    @property
    def schema_version(self) -> int:
        return self._executor.submit(lambda: self._call(lambda db: db.execute("PRAGMA user_version").fetchone()[0])).result()

    async def start(self) -> None:
        """Opened already (at construction)."""

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None
        return fn(self._db)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_now)

    def close_now(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._searches.shutdown(cancel_futures=True)  # a running one ends by its deadline
        self._executor.submit(close).result()
        self._executor.shutdown()

    # -- conversations ------------------------------------------------------------------------

    async def conversations(self, session: str) -> list[Conversation]:
        def q(db: sqlite3.Connection) -> list[Conversation]:
            rows = db.execute("SELECT id, title, created, updated FROM conversations WHERE session = ? ORDER BY updated DESC, id DESC", (session,))
            return [Conversation(**dict(r)) for r in rows]

        return await self._run(q)

    async def conversation(self, session: str, conversation_id: int) -> Conversation | None:
        def q(db: sqlite3.Connection) -> Conversation | None:
            r = db.execute("SELECT id, title, created, updated FROM conversations WHERE id = ? AND session = ?", (conversation_id, session)).fetchone()
            return Conversation(**dict(r)) if r else None

        return await self._run(q)

    async def create_conversation(self, session: str, first_message: str) -> Conversation:
        def q(db: sqlite3.Connection) -> Conversation:
            now = time.time()
            title = _title_of(first_message)
            cur = db.execute("INSERT INTO conversations (session, title, created, updated) VALUES (?, ?, ?, ?)", (session, title, now, now))
            return Conversation(int(cur.lastrowid or 0), title, now, now)

        return await self._run(q)

    async def rename(self, session: str, conversation_id: int, title: str) -> bool:
        title = " ".join(title.split())[:200] or "Untitled"
        return await self._run(lambda db: db.execute("UPDATE conversations SET title = ? WHERE id = ? AND session = ?", (title, conversation_id, session)).rowcount > 0)

    async def delete(self, session: str, conversation_id: int) -> bool:
        return await self._run(lambda db: db.execute("DELETE FROM conversations WHERE id = ? AND session = ?", (conversation_id, session)).rowcount > 0)

    # -- messages -----------------------------------------------------------------------------

    async def messages(self, session: str, conversation_id: int) -> list[Message]:
        def q(db: sqlite3.Connection) -> list[Message]:
            rows = db.execute(
                "SELECT m.id, m.conversation_id, m.role, m.content, m.reasoning, m.finish_reason, m.completion_tokens, m.tokens_per_second"
                " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE c.id = ? AND c.session = ? ORDER BY m.id",
                (conversation_id, session),
            )
            return [Message(**dict(r)) for r in rows]

        return await self._run(q)

    async def add_exchange(self, conversation_id: int, user_text: str) -> tuple[int, int]:
        """Stores a user message and an empty assistant message to be filled in; their ids."""

        def q(db: sqlite3.Connection) -> tuple[int, int]:
            now = time.time()
            with db:
                db.execute("BEGIN")
                u = db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'user', ?, ?)", (conversation_id, user_text, now)).lastrowid
                a = db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'assistant', '', ?)", (conversation_id, now)).lastrowid
                db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            return int(u or 0), int(a or 0)

        return await self._run(q)

    async def save_partial(self, message_id: int, *, content: str, reasoning: str) -> None:
        """Saves an answer still being written (its finish stays unset: if the server stops
        before it ends, the next start marks it interrupted)."""
        await self._run(lambda db: db.execute("UPDATE messages SET content = ?, reasoning = ? WHERE id = ?", (content, reasoning, message_id)))

    async def finish_answer(
        self, message_id: int, *, content: str, reasoning: str, finish_reason: str, completion_tokens: int | None, tokens_per_second: float | None
    ) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE messages SET content = ?, reasoning = ?, finish_reason = ?, completion_tokens = ?, tokens_per_second = ? WHERE id = ?",
                (content, reasoning, finish_reason, completion_tokens, tokens_per_second, message_id),
            )

        await self._run(q)

    async def interrupt(self, message_id: int) -> bool:
        sql = "UPDATE messages SET finish_reason = 'interrupted' WHERE id = ? AND finish_reason IS NULL"
        return await self._run(lambda db: db.execute(sql, (message_id,)).rowcount > 0)

    async def search(self, session: str, text: str, limit: int = 20) -> list[SearchHit]:
        query = _fts_query(text)
        if not query:
            return []
        deadline = time.monotonic() + SEARCH_SECONDS

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
                    raise SearchError(f"the search took longer than {SEARCH_SECONDS:g} s; try fewer or longer words") from None
                if "locked" in str(e):  # an in-memory history being written: its tables lock
                    raise SearchError("the history is busy; try again") from None
                raise
            finally:
                db.close()
            return [SearchHit(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await asyncio.get_running_loop().run_in_executor(self._searches, q)
