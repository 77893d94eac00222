"""The conversation history's one interface, on both of its databases: SQLite (the default) and
PostgreSQL (real servers, started by pytest-postgresql)."""

from __future__ import annotations

import asyncio

import pytest
from smolcandle.server import limits as history_module  # the search limits' home
from smolcandle.server.history import SearchError, open_history


def _run(target: str, body, **kw) -> None:
    async def go() -> None:
        h = open_history(target, **kw)
        await h.start()
        try:
            await body(h)
        finally:
            await h.close()

    asyncio.run(go())


def test_conversations_and_messages_belong_to_their_session(history_target):
    async def body(h) -> None:
        a = await h.create_conversation("alice", "  Plan   a trip to\nthe mountains " + "x" * 80)
        assert a.title.startswith("Plan a trip to the mountains") and a.title.endswith("…") and len(a.title) == 60
        b = await h.create_conversation("bob", "Hello")
        assert [c.id for c in await h.conversations("alice")] == [a.id]
        assert await h.conversation("bob", a.id) is None and await h.messages("bob", a.id) == []
        u, m = await h.add_exchange(a.id, "Where should we go?")
        assert m > u
        await h.save_partial(m, content="The Alps", reasoning="thinking…")
        partial = (await h.messages("alice", a.id))[-1]
        assert (partial.content, partial.finish_reason) == ("The Alps", None)
        await h.finish_answer(m, content="The Alps are lovely.", reasoning="r", finish_reason="stop", completion_tokens=5, tokens_per_second=12.5)
        msgs = await h.messages("alice", a.id)
        assert [(x.role, x.content) for x in msgs] == [("user", "Where should we go?"), ("assistant", "The Alps are lovely.")]
        assert (msgs[1].finish_reason, msgs[1].completion_tokens, msgs[1].tokens_per_second) == ("stop", 5, 12.5)
        assert msgs[1].to_chat() == {"role": "assistant", "content": "The Alps are lovely."}
        # the newest conversation first
        await h.add_exchange(b.id, "hi")
        c = await h.create_conversation("alice", "Second")
        assert [x.id for x in await h.conversations("alice")] == [c.id, a.id]
        assert await h.rename("alice", a.id, "  New\ttitle ") and (await h.conversation("alice", a.id)).title == "New title"
        assert not await h.rename("bob", a.id, "stolen")
        assert not await h.delete("bob", a.id)
        assert await h.delete("alice", a.id) and await h.messages("alice", a.id) == []
        assert not await h.delete("alice", a.id)

    _run(history_target, body)


def test_an_unfinished_answer_is_marked_interrupted(history_target):
    ids = {}

    async def write(h) -> None:
        conv = await h.create_conversation("s", "q")
        _, ids["a"] = await h.add_exchange(conv.id, "q")
        await h.save_partial(ids["a"], content="half an answ", reasoning="")
        ids["conv"] = conv.id

    async def shared(h) -> None:  # replicas: nothing is marked at start
        assert (await h.messages("s", ids["conv"]))[-1].finish_reason is None
        assert await h.interrupt(ids["a"]) and not await h.interrupt(ids["a"])
        m = (await h.messages("s", ids["conv"]))[-1]
        assert (m.content, m.finish_reason) == ("half an answ", "interrupted")

    _run(history_target, write)
    _run(history_target, shared, unfinished_are_interrupted=False)

    async def restarted(h) -> None:  # one server: a restart marks what it left unfinished
        _, a2 = await h.add_exchange(ids["conv"], "again")
        ids["a2"] = a2

    _run(history_target, restarted, unfinished_are_interrupted=False)

    async def check(h) -> None:
        assert (await h.messages("s", ids["conv"]))[-1].finish_reason == "interrupted"

    _run(history_target, check)


def test_search_matches_word_prefixes_folds_accents_and_marks_matches(history_target):
    async def body(h) -> None:
        conv = await h.create_conversation("s", "Planets")
        _, a = await h.add_exchange(conv.id, "Tell me about Jupiter, the largest planet.")
        await h.finish_answer(a, content="Jupiter is a gas giant. Its café-coloured bands are clouds.", reasoning="", finish_reason="stop", completion_tokens=1, tokens_per_second=1.0)
        other = await h.create_conversation("t", "x")
        await h.add_exchange(other.id, "Jupiter belongs to t")
        hits = await h.search("s", "jupit")
        assert {x.message_id for x in hits} == {a, a - 1} and all(x.conversation_title == "Planets" for x in hits)
        assert all("\x02" in x.snippet and "\x03" in x.snippet for x in hits)
        assert "\x02Jupiter\x03" in next(x.snippet for x in hits if x.message_id == a)
        assert [x.message_id for x in await h.search("s", "gas GIANT")] == [a]
        assert [x.message_id for x in await h.search("s", "cafe")] == [a]  # accents folded
        assert await h.search("s", "jupiter saturn") == []  # every word is required
        assert await h.search("s", "") == [] and await h.search("s", "   ") == []
        # the query language is not the user's: quotes, operators and syntax are plain words
        for hostile in ['"', "'", "\\", "jupiter'", "a & b | !c", "NEAR(a b)", "*", "content:x", "x:*", "(", "):*"]:
            await h.search("s", hostile)

    _run(history_target, body)


def test_search_limits_and_deadline(history_target, monkeypatch):
    async def body(h) -> None:
        with pytest.raises(SearchError, match="characters"):
            await h.search("s", "w" * 2000)
        with pytest.raises(SearchError, match="at most 8 words"):
            await h.search("s", " ".join(f"w{i}" for i in range(9)))
        conv = await h.create_conversation("s", "x")
        for i in range(300):
            await h.add_exchange(conv.id, f"alpha beta gamma delta {i} " * 40)
        monkeypatch.setattr(history_module, "SEARCH_SECONDS", 0.0005)
        with pytest.raises(SearchError, match="took longer|waited too long"):
            await h.search("s", "a b g d")
        monkeypatch.setattr(history_module, "SEARCH_SECONDS", 5.0)
        assert len(await h.search("s", "alph delt")) == 20

    _run(history_target, body)


def test_the_schema_is_versioned_and_migrations_apply_once(history_target):
    async def body(h) -> None:
        assert h.schema_version >= 1

    _run(history_target, body)
    _run(history_target, body)  # the second start finds the schema current


def test_stored_responses_belong_to_their_owner(history_target):
    """The Responses API's stored responses: read back and deleted by their owner only."""

    async def body(h) -> None:
        await h.store_response("api-key", "resp_1", chain="resp_1", conversation='[{"role": "user", "content": "Hi"}]', body='{"id": "resp_1"}')
        got = await h.response("api-key", "resp_1")
        assert got is not None and got.chain == "resp_1" and got.conversation.startswith("[") and got.body == '{"id": "resp_1"}'
        assert await h.response("addr:10.0.0.2", "resp_1") is None
        assert not await h.delete_response("addr:10.0.0.2", "resp_1")
        assert await h.delete_response("api-key", "resp_1")
        assert await h.response("api-key", "resp_1") is None

    _run(history_target, body)
