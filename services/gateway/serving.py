"""The chat completion use case: publish the request, wait for its result within the deadline."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from faststream.kafka import KafkaBroker

from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.replies import ReplyWaiters
from shared import topics
from shared.logging import bound_request_id
from shared.messages import (
    CancelRequest,
    ChatMessage,
    ChatRequest,
    ChatResult,
    Envelope,
    ReplyRoute,
    new_request_id,
    utcnow,
)

logger = logging.getLogger(__name__)


class ChatService:
    """Publishes chat requests and awaits their results on this instance's reply partition."""

    def __init__(self, broker: KafkaBroker, settings: GatewaySettings, waiters: ReplyWaiters) -> None:
        self.broker = broker
        self.settings = settings
        self.waiters = waiters
        self.reply_to = ReplyRoute(topic=topics.REPLIES, partition=settings.gateway.instance)

    def check_model(self, model: str) -> None:
        """404 unless `model` is `auto`, a pool or a served model id."""
        if model == "auto" or model in self.settings.pools or self.settings.find_model(model):
            return
        raise ApiError(404, f"The model '{model}' does not exist", "invalid_request_error", "model", "model_not_found")

    async def complete(self, body: ChatCompletionRequest, caller: str | None = None) -> ChatResult:
        """Run a chat completion for `caller` (its API key id) end to end; the result may carry an error."""
        self.check_model(body.model)
        timeout = self.settings.gateway.request_timeout_s
        request = body.to_chat_request(new_request_id(), utcnow() + timedelta(seconds=timeout), self.reply_to)
        request.caller = caller
        return await self.round_trip(request, timeout)

    async def round_trip(self, request: ChatRequest, wait_s: float) -> ChatResult:
        """Publish `request` and wait up to `wait_s` seconds for its result."""
        with bound_request_id(request.request_id):
            future = self.waiters.expect(request.request_id)
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

    async def publish(self, request: ChatRequest) -> None:
        """Put the request on the requests topic; 503 when Kafka does not take it."""
        key = request.request_id.encode()
        await self.publish_or_503(request, topics.REQUESTS, key, correlation_id=request.request_id)

    async def cancel(self, request_id: str) -> None:
        """Ask every router and worker to skip `request_id` (one that is already running finishes)."""
        await self.publish_or_503(CancelRequest(request_id=request_id), topics.CONTROL, request_id.encode())

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
