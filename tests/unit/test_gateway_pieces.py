"""Gateway logic that needs no broker: reply matching and error translation."""

from __future__ import annotations

import asyncio

from services.gateway.errors import error_from_result
from services.gateway.replies import ReplyWaiters
from shared.messages import ChatResult, ErrorInfo, utcnow


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
