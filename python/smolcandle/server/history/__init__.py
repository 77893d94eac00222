"""Conversation history (moved here from history.py and history_pg.py, to be split by concern)."""

from .postgres import PostgresHistory
from .sqlite import SEARCH_SECONDS, Conversation, HistoryStore, Message, SearchError, SearchHit, SqliteHistory

__all__ = ["SEARCH_SECONDS", "Conversation", "HistoryStore", "Message", "PostgresHistory", "SearchError", "SearchHit", "SqliteHistory"]
