"""Gateway logic that needs no broker: reply matching, streams, the cache and error translation."""

from __future__ import annotations

import asyncio

from services.gateway.cache import ResponseCache, cache_key
from services.gateway.errors import error_from_result
from services.gateway.replies import ReplyWaiters
from services.gateway.streaming import StreamAssembler
from shared.messages import ChatChunk, ChatMessage, ChatRequest, ChatResult, Choice, ErrorInfo, utcnow


async def test_a_result_wakes_only_its_own_waiter() -> None:
    waiters = ReplyWaiters()
    first, second = waiters.expect("a"), waiters.expect("b")
    assert waiters.deliver(ChatResult(request_id="b", created_at=utcnow()))
    assert second.done() and not first.done()
    assert not waiters.deliver(ChatResult(request_id="b", created_at=utcnow()))  # duplicate: nobody waits
    waiters.forget("a")
    assert len(waiters) == 0
    await asyncio.sleep(0)


def test_result_errors_map_to_openai_statuses() -> None:
    def status(type_: str, code: str | None = None) -> int:
        result = ChatResult(request_id="x", created_at=utcnow(), error=ErrorInfo(type=type_, message="m", code=code))
        return error_from_result(result).status

    assert status("invalid_request_error", "model_not_found") == 404
    assert status("invalid_request_error", "context_length_exceeded") == 400
    assert status("timeout") == 504
    assert status("server_error") == 500


def chunk(stream_id: str, seq: int, delta: str) -> ChatChunk:
    return ChatChunk(request_id="r", stream_id=stream_id, seq=seq, delta=delta)


def answer(text: str) -> ChatResult:
    return ChatResult(
        request_id="r", created_at=utcnow(), choices=[Choice(message=ChatMessage(role="assistant", content=text))]
    )


def test_a_stream_shows_text_once_even_across_redelivery_and_a_retried_run() -> None:
    assembler = StreamAssembler()
    assert assembler.add(chunk("run1", 0, "Hel")) == "Hel"
    assert assembler.add(chunk("run1", 0, "Hel")) == ""  # the same chunk again
    assert assembler.add(chunk("run1", 1, "lo")) == "lo"
    assert assembler.add(chunk("run2", 0, "He")) == ""  # a second run, behind what was shown
    assert assembler.add(chunk("run2", 1, "llo, w")) == ", w"  # ... until it gets ahead
    assert assembler.add(chunk("run1", 3, "x")) == ""  # a gap: wait for the result
    assert assembler.finish(answer("Hello, world")) == "orld"
    assert assembler.shown == "Hello, world"


def test_a_result_that_disagrees_with_the_stream_adds_nothing() -> None:
    assembler = StreamAssembler()
    assembler.add(chunk("run1", 0, "Hello"))
    assert assembler.finish(answer("Goodbye")) == ""


def test_the_cache_keeps_deterministic_answers_by_what_decides_them() -> None:
    cache = ResponseCache(max_entries=2, ttl_s=60)
    ask = ChatRequest(messages=[ChatMessage(role="user", content="hi")], temperature=0)
    same = ask.model_copy(update={"request_id": "other", "user": "someone else"})
    longer = ask.model_copy(update={"max_tokens": 5})
    assert cache_key(ask) == cache_key(same) != cache_key(longer)
    cache.put(cache_key(ask), answer("hello"))
    assert cache.get(cache_key(same)) is not None and cache.get(cache_key(longer)) is None
    cache.put("a", answer("a"))
    cache.put("b", answer("b"))  # the least recently used entry (`ask`'s) goes
    assert cache.get(cache_key(ask)) is None and cache.hits == 1 and cache.misses == 2
