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

from prometheus_client import CollectorRegistry, Counter

from shared.messages import ChatResult, Reply

logger = logging.getLogger(__name__)


class ReplyWaiters:
    """In-flight requests keyed by request id: a future for a result, or a queue for a stream."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._waiting: dict[str, asyncio.Future[ChatResult]] = {}
        self._streams: dict[str, asyncio.Queue[Reply]] = {}
        # Unclaimed: nobody waited for it (late, a duplicate, or - a bug - another gateway's reply).
        self.replies = Counter(
            "autoglm_gateway_replies", "Results and chunks read, by outcome", ["outcome"],
            registry=registry or CollectorRegistry(),  # not the global one: tests make many
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self._waiting) + len(self._streams)

    def expect(self, request_id: str) -> asyncio.Future[ChatResult]:
        """Register interest in a request's result before publishing it (so it cannot be missed)."""
        future: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def expect_stream(self, request_id: str) -> asyncio.Queue[Reply]:
        """Register a streamed request: its chunks, then its result, arrive on the queue."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._streams[request_id] = queue
        return queue

    def forget(self, request_id: str) -> None:
        """Stop waiting (the client got its answer, timed out or went away)."""
        self._waiting.pop(request_id, None)
        self._streams.pop(request_id, None)

    def deliver(self, reply: Reply) -> bool:
        """Hand a reply to whoever waits for it; False when nobody does."""
        if (stream := self._streams.get(reply.request_id)) is not None:
            stream.put_nowait(reply)
        elif isinstance(reply, ChatResult) and (future := self._waiting.pop(reply.request_id, None)) is not None:
            future.set_result(reply)
        else:
            logger.debug("no waiter for reply %s", reply.request_id)
            self.replies.labels("unclaimed").inc()
            return False
        self.replies.labels("delivered").inc()
        return True
