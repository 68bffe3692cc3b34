"""The router's subscriber: one request in, one routed job (or an error result) out."""

from __future__ import annotations

import logging

from faststream import AckPolicy
from faststream.kafka import KafkaBroker

from services.router.routing import UnroutableError, decide
from shared import topics
from shared.cancellation import CancelledRequests
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter, publish_result
from shared.logging import bound_request_id
from shared.messages import ChatRequest, ChatResult, ErrorInfo, RoutedJob
from shared.settings import CommonSettings

logger = logging.getLogger(__name__)

GROUP_ID = "autoglm-router"


def register_handlers(broker: KafkaBroker, settings: CommonSettings) -> None:
    """Subscribe the router to the requests topic."""
    cancelled = CancelledRequests()
    cancelled.subscribe(broker, "router")
    job_publishers = {
        pool: broker.publisher(topics.jobs_topic(pool), schema=RoutedJob, title=f"jobs for pool {pool}")
        for pool in settings.pools
    }

    @broker.subscriber(
        topics.REQUESTS,
        group_id=GROUP_ID,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,  # a failed publish is redelivered, never skipped
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title="route requests",
    )
    async def route_request(request: ChatRequest) -> None:
        """Score the request and send it to its pool's jobs topic."""
        with bound_request_id(request.request_id):
            if request.request_id in cancelled:
                await publish_result(broker, cancelled_before_routing(request), request.reply_to)
                return
            try:
                decision = decide(request, settings)
            except UnroutableError as error:
                await reject_unroutable(broker, request, error)
                return
            job = decision.to_job(request)
            await job_publishers[decision.pool].publish(job, key=request.request_id.encode())
            logger.info("routed to %s/%s (%s)", decision.pool, decision.model, "; ".join(decision.reasons))


def cancelled_before_routing(request: ChatRequest) -> ChatResult:
    """The answer for a request cancelled before the router saw it."""
    error = ErrorInfo(type="cancelled", code="request_cancelled", message="the request was cancelled")
    return ChatResult(
        request_id=request.request_id,
        error=error,
        created_at=request.created_at,
        probe=request.probe,
        reasons=["cancelled before routing"],
    )


async def reject_unroutable(broker: KafkaBroker, request: ChatRequest, error: UnroutableError) -> None:
    """Answer the caller with an error result and keep a dead letter with the reason."""
    result = ChatResult(
        request_id=request.request_id,
        error=ErrorInfo(type="invalid_request_error", code="model_not_found", message=str(error)),
        created_at=request.created_at,
        probe=request.probe,
        reasons=[f"unroutable: no pool serves model {request.model!r}"],
    )
    await publish_result(broker, result, request.reply_to)
    await publish_dead_letter(
        broker,
        service="router",
        source_topic=topics.REQUESTS,
        body=request.model_dump_json().encode(),
        error=error,
        request_id=request.request_id,
    )
