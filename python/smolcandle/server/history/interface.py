"""What the server asks of a history, whichever database keeps it: the :class:`HistoryStore`
interface, the records it hands out, and the rules both databases apply alike (titles, the
words of a search and their limits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .. import limits


class SearchError(ValueError):
    """A search that is too long, or that ran out of time; the message says which."""


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
class StoredResponse:
    """A response the Responses API kept: ``chain`` is the id of the first response of its
    conversation, ``conversation`` the messages up to and with its output (JSON), ``body`` the
    response object (JSON)."""

    id: str
    chain: str
    conversation: str
    body: str
    created: float


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int
    role: str
    snippet: str  # plain text; the matched terms between \x02 and \x03


def title_of(text: str, limit: int = 60) -> str:
    """A new conversation's title: its first message on one line, cut at ``limit`` characters."""
    line = " ".join(text.split())
    return (line[: limit - 1] + "…") if len(line) > limit else (line or "New chat")


def chosen_title(text: str) -> str:
    """A title the user typed, on one line and at most 200 characters."""
    return " ".join(text.split())[:200] or "Untitled"


def search_words(text: str) -> list[str]:
    """The distinct words of a search, each to be matched as a word prefix, all required.
    Raises :class:`SearchError` past the limits of words and characters."""
    if len(text) > limits.MAX_SEARCH_CHARS:
        raise SearchError(f"a search may hold at most {limits.MAX_SEARCH_CHARS} characters")
    words = list(dict.fromkeys(w for w in text.split() if w.strip()))
    if len(words) > limits.MAX_SEARCH_TERMS:
        raise SearchError(f"a search may hold at most {limits.MAX_SEARCH_TERMS} words")
    return words


class HistoryStore(Protocol):
    """What the server keeps of its conversations, on whichever database. :meth:`start` opens
    it (nothing is opened before), :meth:`close` closes it. Every method is a coroutine; none
    blocks the event loop."""

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

    async def store_response(self, owner: str, response_id: str, *, chain: str, conversation: str, body: str) -> None:
        """Keeps a response of the Responses API for ``owner`` (an API key or address)."""

    async def response(self, owner: str, response_id: str) -> StoredResponse | None:
        """A stored response, if ``owner`` stored it."""

    async def delete_response(self, owner: str, response_id: str) -> bool:
        """Deletes a stored response of ``owner``; False if it had none by that id."""

    async def search(self, session: str, text: str, limit: int = 20) -> list[SearchHit]:
        """The session's messages holding every word of ``text`` (as word prefixes), best
        first, each with a snippet whose matches are between \\x02 and \\x03. Raises
        :class:`SearchError` for a search past the limits or out of time
        (:data:`~smolcandle.server.limits.SEARCH_SECONDS`)."""
