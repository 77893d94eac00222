"""The SQL that SQLite and PostgreSQL answer alike, written once, and the store methods built on it.

The statements are written with ``?`` placeholders; a driver that marks them otherwise (psycopg:
``%s``) takes its copy from :meth:`Statements.marked`. :class:`SqlHistory` holds every method of
:class:`~.interface.HistoryStore` whose SQL is shared, over five primitives that each database
implements. What stays with each database is what its SQL cannot share: the schema and how its
versions are counted (column types, FTS5 against a ``tsvector`` column), how an insert hands back
its row's id (``lastrowid``; ``RETURNING``, which older SQLite lacks), how statements run (one
worker thread; a pool of asyncio connections), and search (its query language, its snippets and
ranking, and how each is cut short).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .interface import Conversation, Message, StoredResponse, chosen_title, title_of

Args = tuple[Any, ...]

_MESSAGE_COLUMNS = "m.id, m.conversation_id, m.role, m.content, m.reasoning, m.finish_reason, m.completion_tokens, m.tokens_per_second"


@dataclass(frozen=True)
class Statements:
    """Every statement both databases share, with ``?`` placeholders."""

    conversations: str = "SELECT id, title, created, updated FROM conversations WHERE session = ? ORDER BY updated DESC, id DESC"
    conversation: str = "SELECT id, title, created, updated FROM conversations WHERE id = ? AND session = ?"
    new_conversation: str = "INSERT INTO conversations (session, title, created, updated) VALUES (?, ?, ?, ?)"
    rename: str = "UPDATE conversations SET title = ? WHERE id = ? AND session = ?"
    delete: str = "DELETE FROM conversations WHERE id = ? AND session = ?"
    touch: str = "UPDATE conversations SET updated = ? WHERE id = ?"
    messages: str = (
        f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE c.id = ? AND c.session = ? ORDER BY m.id"
    )
    new_message: str = "INSERT INTO messages (conversation_id, role, content, created) VALUES (?, ?, ?, ?)"
    save_partial: str = "UPDATE messages SET content = ?, reasoning = ? WHERE id = ?"
    finish: str = "UPDATE messages SET content = ?, reasoning = ?, finish_reason = ?, completion_tokens = ?, tokens_per_second = ? WHERE id = ?"
    interrupt: str = "UPDATE messages SET finish_reason = 'interrupted' WHERE id = ? AND finish_reason IS NULL"
    # At start, on one server: a message still generating when it stopped keeps what it had,
    # marked as such.
    interrupt_unfinished: str = "UPDATE messages SET finish_reason = 'interrupted' WHERE role = 'assistant' AND finish_reason IS NULL"

    new_response: str = "INSERT INTO responses (id, owner, chain, conversation, body, created) VALUES (?, ?, ?, ?, ?, ?)"
    response: str = "SELECT id, chain, conversation, body, created FROM responses WHERE id = ? AND owner = ?"
    delete_response: str = "DELETE FROM responses WHERE id = ? AND owner = ?"

    def marked(self, placeholder: str) -> Statements:
        """The statements with ``placeholder`` for each ``?`` (none holds a ``?`` otherwise)."""
        return Statements(**{f.name: getattr(self, f.name).replace("?", placeholder) for f in fields(self)})


class SqlHistory(ABC):
    """The methods of a :class:`~.interface.HistoryStore` whose SQL both databases share. A
    database sets :attr:`sql` and implements the primitives that run it."""

    sql: ClassVar[Statements]

    @abstractmethod
    async def _rows(self, sql: str, args: Args) -> list[dict[str, Any]]:
        """The rows a query returns, as dicts by column name."""

    @abstractmethod
    async def _row(self, sql: str, args: Args) -> dict[str, Any] | None:
        """The first row a query returns, if any."""

    @abstractmethod
    async def _changed(self, sql: str, args: Args) -> int:
        """Runs a statement: the number of rows it changed."""

    @abstractmethod
    async def _insert(self, sql: str, args: Args) -> int:
        """Runs an ``INSERT`` of one row: the row's id."""

    @abstractmethod
    async def _insert_then(self, inserts: Sequence[tuple[str, Args]], then: tuple[str, Args]) -> list[int]:
        """Runs the ``inserts`` and then ``then``, in one transaction: the inserted rows' ids."""

    # -- conversations ------------------------------------------------------------------------

    async def conversations(self, session: str) -> list[Conversation]:
        return [Conversation(**r) for r in await self._rows(self.sql.conversations, (session,))]

    async def conversation(self, session: str, conversation_id: int) -> Conversation | None:
        r = await self._row(self.sql.conversation, (conversation_id, session))
        return Conversation(**r) if r else None

    async def create_conversation(self, session: str, first_message: str) -> Conversation:
        now, title = time.time(), title_of(first_message)
        conversation_id = await self._insert(self.sql.new_conversation, (session, title, now, now))
        return Conversation(conversation_id, title, now, now)

    async def rename(self, session: str, conversation_id: int, title: str) -> bool:
        return await self._changed(self.sql.rename, (chosen_title(title), conversation_id, session)) > 0

    async def delete(self, session: str, conversation_id: int) -> bool:
        return await self._changed(self.sql.delete, (conversation_id, session)) > 0

    # -- messages -----------------------------------------------------------------------------

    async def messages(self, session: str, conversation_id: int) -> list[Message]:
        return [Message(**r) for r in await self._rows(self.sql.messages, (conversation_id, session))]

    async def add_exchange(self, conversation_id: int, user_text: str) -> tuple[int, int]:
        """Stores a user message and an empty assistant message to be filled in; their ids."""
        now = time.time()
        user, answer = await self._insert_then(
            [(self.sql.new_message, (conversation_id, "user", user_text, now)), (self.sql.new_message, (conversation_id, "assistant", "", now))],
            (self.sql.touch, (now, conversation_id)),
        )
        return user, answer

    async def save_partial(self, message_id: int, *, content: str, reasoning: str) -> None:
        """Saves an answer still being written (its finish stays unset: if the server stops
        before it ends, the next start marks it interrupted)."""
        await self._changed(self.sql.save_partial, (content, reasoning, message_id))

    async def finish_answer(
        self, message_id: int, *, content: str, reasoning: str, finish_reason: str, completion_tokens: int | None, tokens_per_second: float | None
    ) -> None:
        await self._changed(self.sql.finish, (content, reasoning, finish_reason, completion_tokens, tokens_per_second, message_id))

    async def interrupt(self, message_id: int) -> bool:
        """Marks an answer whose writer died as interrupted, keeping what was saved of it;
        False if it had already finished."""
        return await self._changed(self.sql.interrupt, (message_id,)) > 0

    # -- stored responses (the Responses API) -----------------------------------------------

    async def store_response(self, owner: str, response_id: str, *, chain: str, conversation: str, body: str) -> None:
        """Keeps a response for ``owner``: its ``chain`` (the first response of the
        conversation it continues), the ``conversation`` up to and with its output (JSON) and
        its ``body`` (JSON), for a follow-up to continue and for reading it back."""
        await self._changed(self.sql.new_response, (response_id, owner, chain, conversation, body, time.time()))

    async def response(self, owner: str, response_id: str) -> StoredResponse | None:
        r = await self._row(self.sql.response, (response_id, owner))
        return StoredResponse(**r) if r else None

    async def delete_response(self, owner: str, response_id: str) -> bool:
        return await self._changed(self.sql.delete_response, (response_id, owner)) > 0
