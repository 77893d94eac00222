"""Conversation history: conversations, their messages, and full-text search over them.

:class:`HistoryStore` (in :mod:`.interface`) is what the server asks of a history:
:class:`SqliteHistory` (the default) or :class:`PostgresHistory`, which replicas share; the SQL
they share is written once (:mod:`.sql`). :func:`open_history` makes either from a path or a
``postgresql://`` URL. Conversations belong to the browser session that made them; every read
and write names the session.

Lifecycle, the same for both: constructing a store opens nothing; ``await store.start()`` opens
it (connects, brings the schema to the current version and, on one server, marks answers a
previous run left unfinished as interrupted); ``await store.close()`` closes it.
"""

from __future__ import annotations

from pathlib import Path

from ... import store
from .interface import (
    Conversation,
    HistoryStore,
    Message,
    SearchError,
    SearchHit,
    StoredResponse,
)
from .postgres import PostgresHistory
from .sqlite import SqliteHistory

__all__ = [
    "Conversation",
    "HistoryStore",
    "Message",
    "PostgresHistory",
    "SearchError",
    "SearchHit",
    "SqliteHistory",
    "StoredResponse",
    "default_db_path",
    "open_history",
]


def default_db_path() -> Path:
    return store.home() / "history.sqlite3"


def open_history(target: str | Path, *, unfinished_are_interrupted: bool = True) -> HistoryStore:
    """The history at ``target``: a ``postgresql://`` URL, or an SQLite file (``":memory:"``
    keeps nothing). With ``unfinished_are_interrupted``, answers left unfinished by a previous
    run are marked interrupted at start: right for one server, wrong for replicas sharing a
    database (there, a replica that dies has its answers marked by the others). Nothing is
    opened until ``await history.start()``."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return PostgresHistory(target, unfinished_are_interrupted=unfinished_are_interrupted)
    return SqliteHistory(target, unfinished_are_interrupted=unfinished_are_interrupted)
