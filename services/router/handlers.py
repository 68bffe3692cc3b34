"""The router's subscribers: batches of requests in, routed jobs (or error results) out, then the commit.

Besides the requests, the router reads every result (no group: each instance sees all of them) to
feed each pool's circuit breaker and queue-wait average, and the registry (see app.py) for live pools.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TopicPartition
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from services.router.breaker import CircuitBreaker
from services.router.load import PoolLoad
from services.router.routing import Decision, PoolView, UnroutableError, decide
from services.router.scoring import Score, score_batch, score_clear
from shared import topics
from shared.cancellation import CancelledRequests
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter, publish_result, rewind
from shared.logging import bound_request_id
from shared.messages import ChatRequest, ChatResult, ErrorInfo, RoutedJob
from shared.registry import RegistryView
from shared.settings import CommonSettings
from shared.telemetry import in_trace, record_context

logger = logging.getLogger(__name__)
TRACER = trace.get_tracer(__name__)

GROUP_ID = "autoglm-router"
MAX_BATCH = 64
BATCH_WAIT_MS = 5  # an idle poll blocks this long: routing must not add latency


class PoolState:
    """Everything the router knows about its pools: live cards, breakers, lag and queue wait."""

    def __init__(self, settings: CommonSettings, registry: RegistryView, load: PoolLoad) -> None:
        self.settings = settings
        self.registry = registry
        self.load = load
        self.breakers = {pool: CircuitBreaker(settings.routing.breaker) for pool in settings.pools}

    async def view(self) -> PoolView:
        """A snapshot for one batch; a pool without live cards (while others have some) opens its breaker."""
        # Still reading the registry (just started), or no card anywhere: trust the configuration.
        live = None if self.registry.replaying else (self.registry.live_pools() or None)
        for pool, breaker in self.breakers.items():
            if live is not None and pool not in live:
                breaker.mark_unavailable()
            else:
                breaker.mark_available()
        lag = await self.load.lag() if self.settings.routing.spill.enabled else {}
        return PoolView(live_pools=live, lag=lag, queue_ms=dict(self.load.queue_ms), breakers=self.breakers)

    def observe(self, result: ChatResult) -> None:
        """Feed one result of a pool (the router's own error results name no pool) to its breaker."""
        if result.pool not in self.breakers or (result.probe and result.ok):
            return
        failed = result.error is not None and result.error.type == "server_error"
        self.breakers[result.pool].record(failed)
        if result.ok:
            self.load.observe_queue_ms(result.pool, result.timings.queue_ms)


def register_handlers(broker: KafkaBroker, settings: CommonSettings, state: PoolState) -> None:
    """Subscribe the router to the requests topic (batched) and the results topic (for the breakers)."""
    cancelled = CancelledRequests()
    cancelled.subscribe(broker, "router")
    for pool in settings.pools:  # documented in AsyncAPI; publishing goes by topic name
        broker.publisher(topics.jobs_topic(pool), schema=RoutedJob, title=f"jobs for pool {pool}")
        broker.publisher(topics.priority_topic(pool), schema=RoutedJob, title=f"priority jobs for pool {pool}")

    @broker.subscriber(
        topics.REQUESTS,
        group_id=GROUP_ID,
        batch=True,
        max_records=MAX_BATCH,
        batch_timeout_ms=BATCH_WAIT_MS,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,  # committed only once every job of the batch is published
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title="route requests",
    )
    async def route_requests(message: KafkaMessage) -> None:
        """Score the batch and send each request to its pool's jobs topic; on failure read it again."""
        records: tuple[ConsumerRecord, ...] = message.raw_message
        try:
            parsed = await parse_requests(broker, records)
            await route_batch(broker, settings, cancelled, parsed, await state.view())
        except Exception:
            logger.exception("routing a batch of %d failed; it will be read again", len(records))
            await asyncio.sleep(settings.retries.backoff.initial_ms / 1000)
            if hasattr(message.consumer, "seek"):  # absent on the in-memory test broker
                rewind(message.consumer, records)
            await message.nack()
            return
        await message.ack()

    @broker.subscriber(
        partitions=[
            TopicPartition(topics.RESULTS, index, declare=False) for index in range(settings.topics.results.partitions)
        ],
        auto_offset_reset="latest",  # no group: every router instance sees every result from its start on
        ack_policy=AckPolicy.ACK_FIRST,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title="watch results (circuit breakers)",
    )
    async def watch_result(result: ChatResult) -> None:
        """Feed the breakers and the queue-wait averages."""
        state.observe(result)


async def route_batch(
    broker: KafkaBroker,
    settings: CommonSettings,
    cancelled: CancelledRequests,
    parsed: list[tuple[ConsumerRecord, ChatRequest]],
    view: PoolView,
) -> None:
    """Route the requests the cheap features settle at once, the others once their embedding is scored."""
    first = score_clear([request for _, request in parsed])
    undecided = [pair for pair, score in zip(parsed, first, strict=True) if score is None]
    # In a thread: the embedding's CPU time would be the event loop's otherwise, and the clear requests
    # are routed meanwhile instead of waiting for it.
    embedding = asyncio.create_task(asyncio.to_thread(score_batch, [request for _, request in undecided]))  # noqa: RUF006 - awaited below

    async def route_all(scored: list[tuple[tuple[ConsumerRecord, ChatRequest], Score]]) -> None:
        await asyncio.gather(
            *(
                traced(record, route_one(broker, settings, cancelled, request=request, score=score, view=view))
                for (record, request), score in scored
            )
        )

    try:
        await route_all([(pair, score) for pair, score in zip(parsed, first, strict=True) if score is not None])
    finally:
        scores = await embedding  # a thread cannot be cancelled: a retry of the batch waits for it
    await route_all(list(zip(undecided, scores, strict=True)))


async def traced(record: ConsumerRecord, work: Awaitable[None]) -> None:
    """Run `work` in a span continuing the record's trace: a batch has no single trace of its own, and the
    job published inside carries this one on to the worker."""
    with TRACER.start_as_current_span("route request", context=record_context(record), kind=SpanKind.CONSUMER):
        await work


async def parse_requests(
    broker: KafkaBroker, records: tuple[ConsumerRecord, ...]
) -> list[tuple[ConsumerRecord, ChatRequest]]:
    """Valid requests of a batch with their records; anything else is dead-lettered with the reason."""
    requests = []
    for record in records:
        try:
            requests.append((record, ChatRequest.model_validate_json(record.value)))
        except ValidationError as error:
            with in_trace(record_context(record)):
                await publish_dead_letter(
                    broker, service="router", source_topic=record.topic, body=record.value, error=error
                )
    return requests


async def route_one(
    broker: KafkaBroker,
    settings: CommonSettings,
    cancelled: CancelledRequests,
    *,
    request: ChatRequest,
    score: Score,
    view: PoolView,
) -> None:
    """Route one request: a job on its pool's topic, or an error result (cancelled, unroutable, unavailable)."""
    with bound_request_id(request.request_id):
        if request.request_id in cancelled:
            await publish_result(broker, cancelled_before_routing(request), request.reply_to)
            return
        try:
            decision = decide(request, settings, view, score)
        except UnroutableError as error:
            await reject_unroutable(broker, request, error)
            return
        if decision.pool is None:
            await reject_unavailable(broker, request, decision)
            return
        await broker.publish(decision.to_job(request), decision.topic, key=request.request_id.encode())
        logger.info(
            "routed to %s/%s by %s (%s)",
            decision.pool, decision.model, decision.explanation.policy, "; ".join(decision.reasons),
        )  # fmt: skip


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


class PoolUnavailableError(RuntimeError):
    """Every pool that could serve the request has its breaker open."""


async def reject_unavailable(broker: KafkaBroker, request: ChatRequest, decision: Decision) -> None:
    """A fast error instead of a job that would wait on a failing pool; the request is dead-lettered for replay."""
    error = PoolUnavailableError("; ".join(decision.explanation.notes) or "no pool can take the request now")
    result = ChatResult(
        request_id=request.request_id,
        score=decision.score,
        error=ErrorInfo(type="server_error", code="pool_unavailable", message=f"{error}; retry later"),
        created_at=request.created_at,
        probe=request.probe,
        reasons=decision.reasons,
        routing=decision.explanation,
    )
    await publish_result(broker, result, request.reply_to)
    await publish_dead_letter(
        broker, service="router", source_topic=topics.REQUESTS, body=request.model_dump_json().encode(),
        error=error, request_id=request.request_id,
    )  # fmt: skip
    logger.warning("answered pool_unavailable: %s", error)
