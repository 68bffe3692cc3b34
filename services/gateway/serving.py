"""The chat completion use case: publish the request, wait for its result within the deadline."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from services.gateway.cache import ResponseCache, cache_key
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.protocol import GenerationParams
from services.gateway.replies import ReplyWaiters
from services.gateway.streaming import ReplyStream
from shared import topics
from shared.logging import bound_request_id
from shared.messages import (
    CancelRequest,
    ChatMessage,
    ChatRequest,
    ChatResult,
    Envelope,
    Reply,
    ReplyRoute,
    new_request_id,
    utcnow,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheLookup:
    """What the response cache said about a request: `status` is hit, miss, bypass or off."""

    status: str
    key: str | None = None
    result: ChatResult | None = None


class ChatService:
    """Publishes chat requests and awaits their results (or streams) on this instance's reply partition."""

    def __init__(
        self, broker: KafkaBroker, settings: GatewaySettings, waiters: ReplyWaiters, cache: ResponseCache
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.waiters = waiters
        self.cache = cache
        self.reply_to = ReplyRoute(topic=topics.REPLIES, partition=settings.gateway.instance)
        self._background: set[asyncio.Task[None]] = set()
        self._callers: dict[str, str | None] = {}  # requests this gateway waits for -> their caller's key id

    def caller_of(self, request_id: str) -> str | None:
        """The key id that made a request this gateway is waiting for (None if it waits for no such request)."""
        return self._callers.get(request_id)

    def check_model(self, model: str) -> None:
        """404 unless `model` is `auto`, a pool or a served model id."""
        if model == "auto" or model in self.settings.pools or self.settings.find_model(model):
            return
        raise ApiError(404, f"The model '{model}' does not exist", "invalid_request_error", "model", "model_not_found")

    def build_request(
        self, body: GenerationParams, request_id: str | None = None, *, wait: bool, caller: str | None = None
    ) -> ChatRequest:
        """The bus message for `body`: with this gateway's reply route when it will `wait` for the answer."""
        self.check_model(body.model)
        options = self.settings.gateway
        lifetime_s = options.request_timeout_s if wait else options.async_deadline_s
        deadline = utcnow() + timedelta(seconds=lifetime_s)
        try:
            request = body.to_chat_request(request_id or new_request_id(), deadline, self.reply_to if wait else None)
        except ValidationError as error:  # a rule of the bus message the HTTP body does not repeat
            first = error.errors()[0]
            raise ApiError(400, f"Invalid request: {first['msg']}", "invalid_request_error", "messages") from None
        request.caller = caller
        return request

    async def submit(self, request: ChatRequest) -> None:
        """Async mode: publish without a reply route; the result is only stored (GET /v1/requests/{id})."""
        with bound_request_id(request.request_id):
            await self.publish(request)
            logger.info("queued without waiting")

    def look_up(self, request: ChatRequest, bypass: bool) -> CacheLookup:
        """Ask the response cache, when the request is deterministic and the caller did not opt out."""
        if not self.settings.gateway.cache.enabled or not (request.temperature == 0 or request.seed is not None):
            return CacheLookup("off")
        if bypass:
            self.cache.bypassed()
            return CacheLookup("bypass")
        key = cache_key(request)
        result = self.cache.get(key)
        return CacheLookup("hit" if result else "miss", key, result)

    def remember(self, lookup: CacheLookup, result: ChatResult | None) -> None:
        if lookup.key is not None and result is not None and lookup.result is None:
            self.cache.put(lookup.key, result)

    async def complete(self, request: ChatRequest, lookup: CacheLookup) -> ChatResult:
        """The request's result (which may carry an error): from the cache, or end to end."""
        if lookup.result is not None:
            return lookup.result
        result = await self.round_trip(request, self.settings.gateway.request_timeout_s)
        self.remember(lookup, result)
        return result

    async def open_stream(self, request: ChatRequest, lookup: CacheLookup) -> ReplyStream:
        """Publish a streamed request and wait for its first reply (an early error raises ApiError)."""
        replies: asyncio.Queue[Reply]
        if lookup.result is not None:
            replies = asyncio.Queue()
            replies.put_nowait(lookup.result)  # the whole text in one piece
            request_id = lookup.result.request_id
        else:
            replies = self.waiters.expect_stream(request.request_id)
            self._callers[request.request_id] = request.caller
            request_id = request.request_id

        def close(stream: ReplyStream) -> None:
            self.waiters.forget(request.request_id)
            self._callers.pop(request.request_id, None)
            if stream.result is None and lookup.result is None:
                self.in_background(self.cancel(request.request_id))  # the client left: stop the work
            self.remember(lookup, stream.result)

        deadline = asyncio.get_running_loop().time() + self.settings.gateway.request_timeout_s
        stream = ReplyStream(request_id, replies, deadline, close)
        try:
            if lookup.result is None:
                await self.publish(request)
            await stream.start()
        except BaseException:
            close(stream)
            raise
        return stream

    def in_background(self, work: Any) -> None:
        """Run a coroutine nobody awaits, logging (not losing) its failure."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(log_failure)

    async def round_trip(self, request: ChatRequest, wait_s: float) -> ChatResult:
        """Publish `request` and wait up to `wait_s` seconds for its result."""
        with bound_request_id(request.request_id):
            future = self.waiters.expect(request.request_id)
            self._callers[request.request_id] = request.caller
            try:
                await self.publish(request)
                return await asyncio.wait_for(future, wait_s)
            except TimeoutError:
                logger.warning("no result within %.1f s", wait_s)
                raise ApiError(
                    504, f"The request did not complete within {wait_s:g} s", "timeout", None, "deadline_exceeded"
                ) from None
            finally:
                self.waiters.forget(request.request_id)
                self._callers.pop(request.request_id, None)

    async def publish(self, request: ChatRequest) -> None:
        """Put the request on the requests topic; 503 when Kafka does not take it."""
        key = request.request_id.encode()
        await self.publish_or_503(request, topics.REQUESTS, key, correlation_id=request.request_id)

    async def cancel(self, request_id: str, requested_by: str | None = None) -> None:
        """Ask every router and worker to skip `request_id` (a running one stops where its engine can)."""
        cancel = CancelRequest(request_id=request_id, requested_by=requested_by)
        await self.publish_or_503(cancel, topics.CONTROL, request_id.encode())

    async def publish_or_503(self, message: Envelope, topic: str, key: bytes, **options: Any) -> None:
        try:
            await self.broker.publish(message, topic, key=key, **options)
        except Exception as error:
            logger.exception("publishing to %s failed", topic)
            raise ApiError(
                503, "The request queue is unavailable, retry later", "server_error", None, "unavailable"
            ) from error

    async def probe(self) -> str | None:
        """Send a probe through router and worker; None when it came back, else why not."""
        timeout = self.settings.gateway.readiness_timeout_s
        request = ChatRequest(
            messages=[ChatMessage(role="user", content="readiness probe")],
            probe=True,
            deadline=utcnow() + timedelta(seconds=timeout),
            reply_to=self.reply_to,
        )
        try:
            result = await self.round_trip(request, timeout)
        except ApiError as error:
            return f"end-to-end probe failed: {error.message}"
        return None if result.ok else f"end-to-end probe failed: {result.error}"


def log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.warning("background work failed: %s", error)
