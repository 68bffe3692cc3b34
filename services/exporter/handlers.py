"""The exporter's subscribers: batches of requests, results and feedback, stored, then committed."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import trace
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterSettings
from services.exporter.store import store_feedback, store_requests, store_results
from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter
from shared.messages import ChatRequest, ChatResult, Feedback
from shared.telemetry import record_context, timed_span

logger = logging.getLogger(__name__)

GROUP_PREFIX = "autoglm-exporter"
MessageT = TypeVar("MessageT", ChatRequest, ChatResult, Feedback)
RecordStore = Callable[[AsyncEngine, list[tuple[ConsumerRecord, MessageT]]], Awaitable[int]]
# W3C trace context: version-traceid-parentid-flags, as FastStream's telemetry middleware writes it.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def register_handlers(broker: KafkaBroker, settings: ExporterSettings, engine: AsyncEngine) -> None:
    """Subscribe the exporter to the requests, results and feedback topics."""
    options = settings.exporter
    backoff_s = settings.retries.backoff.initial_ms / 1000.0

    def batch_subscriber(topic: str):  # type: ignore[no-untyped-def]
        return broker.subscriber(
            topic,
            group_id=f"{GROUP_PREFIX}-{topic}",  # one group per topic: independent rebalances
            batch=True,
            max_records=options.max_batch_size,
            batch_timeout_ms=options.max_wait_ms,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.MANUAL,  # committed only after the database commit
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            title=f"persist {topic}",
        )

    async def persist(message: KafkaMessage, model: type[MessageT], store: RecordStore[MessageT]) -> None:
        items = [
            (record, item)
            for record, item in parse_all(message.raw_message, model)
            if not getattr(item, "probe", False)  # probes are not stored
        ]
        started_ns = time.time_ns()
        try:
            try:
                inserted = await store(engine, items)
            except Exception as error:
                if not is_unstorable(error):
                    raise
                logger.warning("a batch of %s holds an unstorable row; storing it row by row", model.__name__)
                inserted = await store_each_or_dead_letter(items, store)
        except Exception:
            logger.exception("storing %s failed; retrying the batch in %.1f s", model.__name__, backoff_s)
            await asyncio.sleep(backoff_s)
            await message.nack()
            return
        trace_persisted(items, f"persist {model.__name__}", started_ns)
        await message.ack()
        logger.debug("stored %d new %s rows of %d", inserted, model.__name__, len(items))

    async def store_each_or_dead_letter(
        items: list[tuple[ConsumerRecord, MessageT]], store: RecordStore[MessageT]
    ) -> int:
        """Store rows one at a time; a row the database refuses goes to the dead-letter topic."""
        inserted = 0
        for record, item in items:
            try:
                inserted += await store(engine, [(record, item)])
            except Exception as error:
                if not is_unstorable(error):
                    raise
                await publish_dead_letter(
                    broker, service="exporter", source_topic=record.topic, body=record.value,
                    error=error, request_id=item.request_id,
                )  # fmt: skip
        return inserted

    @batch_subscriber(topics.REQUESTS)
    async def persist_requests(message: KafkaMessage) -> None:
        """Store chat requests with the trace each was published in."""
        await persist(message, ChatRequest, store_request_records)

    @batch_subscriber(topics.RESULTS)
    async def persist_results(message: KafkaMessage) -> None:
        """Store chat results."""
        await persist(message, ChatResult, store_result_records)

    @batch_subscriber(topics.FEEDBACK)
    async def persist_feedback(message: KafkaMessage) -> None:
        """Store clients' feedback."""
        await persist(message, Feedback, store_feedback_records)


async def store_request_records(engine: AsyncEngine, items: list[tuple[ConsumerRecord, ChatRequest]]) -> int:
    """Requests, each with the trace id of its record's `traceparent` header."""
    return await store_requests(engine, [request for _, request in items], [trace_id_of(record) for record, _ in items])


async def store_result_records(engine: AsyncEngine, items: list[tuple[ConsumerRecord, ChatResult]]) -> int:
    return await store_results(engine, [result for _, result in items])


async def store_feedback_records(engine: AsyncEngine, items: list[tuple[ConsumerRecord, Feedback]]) -> int:
    return await store_feedback(engine, [feedback for _, feedback in items])


def trace_persisted(items: list[tuple[ConsumerRecord, MessageT]], name: str, started_ns: int) -> None:
    """A span per stored message in the trace it came with, timed as the batch's database write."""
    ended_ns = time.time_ns()
    for record, item in items:
        context = record_context(record)
        if not trace.get_current_span(context).get_span_context().is_valid:
            continue  # a producer that sends no trace context: a lone span would be a trace of its own
        attributes = {"autoglm.request_id": item.request_id, "messaging.destination.name": record.topic}
        timed_span(name, context, started_ns, ended_ns, attributes=attributes)


def trace_id_of(record: ConsumerRecord) -> str | None:
    """The trace id in a record's W3C `traceparent` header; None without one (e.g. a bare producer)."""
    for key, value in record.headers or ():
        if key == "traceparent":
            match = TRACEPARENT.match(value.decode("ascii", errors="replace").strip())
            trace_id = match.group(1) if match else None
            return trace_id if trace_id and trace_id != "0" * 32 else None
    return None


def is_unstorable(error: BaseException) -> bool:
    """True when PostgreSQL refused the data itself, so retrying the same rows cannot help."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, asyncpg.exceptions.DataError | asyncpg.exceptions.IntegrityConstraintViolationError):
            return True
        cause = cause.__cause__
    return False


def parse_all(records: tuple[ConsumerRecord, ...], model: type[MessageT]) -> list[tuple[ConsumerRecord, MessageT]]:
    """Valid messages of a batch with their records. Invalid ones are skipped: the router dead-letters them."""
    parsed = []
    for record in records:
        try:
            parsed.append((record, model.model_validate_json(record.value)))
        except ValidationError as error:
            logger.warning(
                "skipping an invalid %s at %s[%d]@%d: %s",
                model.__name__,
                record.topic,
                record.partition,
                record.offset,
                error.error_count(),
            )
    return parsed
