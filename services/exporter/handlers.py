"""The exporter's subscribers: batches of requests and results, stored, then committed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterSettings
from services.exporter.store import store_requests, store_results
from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS
from shared.messages import ChatRequest, ChatResult

logger = logging.getLogger(__name__)

GROUP_PREFIX = "autoglm-exporter"
MessageT = TypeVar("MessageT", ChatRequest, ChatResult)


def register_handlers(broker: KafkaBroker, settings: ExporterSettings, engine: AsyncEngine) -> None:
    """Subscribe the exporter to the requests and results topics."""
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

    async def persist(
        message: KafkaMessage, model: type[MessageT], store: Callable[[AsyncEngine, list[MessageT]], Awaitable[int]]
    ) -> None:
        try:
            rows = [item for item in parse_all(message.raw_message, model) if not item.probe]
            inserted = await store(engine, rows)
        except Exception:
            logger.exception("storing %s failed; retrying the batch in %.1f s", model.__name__, backoff_s)
            await asyncio.sleep(backoff_s)
            await message.nack()
            return
        await message.ack()
        logger.debug("stored %d new %s rows of %d", inserted, model.__name__, len(rows))

    @batch_subscriber(topics.REQUESTS)
    async def persist_requests(message: KafkaMessage) -> None:
        """Store chat requests."""
        await persist(message, ChatRequest, store_requests)

    @batch_subscriber(topics.RESULTS)
    async def persist_results(message: KafkaMessage) -> None:
        """Store chat results."""
        await persist(message, ChatResult, store_results)


def parse_all(records: tuple[ConsumerRecord, ...], model: type[MessageT]) -> list[MessageT]:
    """Valid messages of a batch. Invalid ones are skipped: the router dead-letters bad requests."""
    parsed = []
    for record in records:
        try:
            parsed.append(model.model_validate_json(record.value))
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
