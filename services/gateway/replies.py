"""Matching results arriving on this gateway's reply partition to the HTTP requests waiting for them.

Reply path: every gateway instance owns one partition of `autoglm.replies` (its `instance` index)
and reads only that partition, by assignment rather than through a consumer group. A request
carries `reply_to = {topic, partition}`; the worker (or the router, for an error) publishes the
result there. So N gateways share one topic and none reads another's replies, and adding a
gateway needs no new topic, only a free partition index.
"""

from __future__ import annotations

import asyncio
import logging

from shared.messages import ChatResult

logger = logging.getLogger(__name__)


class ReplyWaiters:
    """Futures of in-flight requests, keyed by request id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[ChatResult]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, request_id: str) -> asyncio.Future[ChatResult]:
        """Register interest in a request's result before publishing it (so it cannot be missed)."""
        future: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        """Stop waiting (the client got its answer, timed out or went away)."""
        self._waiting.pop(request_id, None)

    def deliver(self, result: ChatResult) -> bool:
        """Hand a result to its waiter; False when nobody waits (late, duplicate or not ours)."""
        future = self._waiting.pop(result.request_id, None)
        if future is None or future.done():
            logger.debug("no waiter for result %s", result.request_id)
            return False
        future.set_result(result)
        return True
