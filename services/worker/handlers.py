"""The worker's subscriber: a batch of jobs in, one result per job out, then the commit."""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import chain
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel, run_batch
from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter, publish_result
from shared.messages import RoutedJob
from shared.settings import Batching

logger = logging.getLogger(__name__)

SERVICE = "worker"
IDLE_POLL_MS = 5  # how long an idle poll blocks; FastStream also sleeps this long after an empty one


def group_id(pool: str) -> str:
    """Consumer group shared by every replica of a pool."""
    return f"autoglm-worker-{pool}"


def register_handlers(broker: KafkaBroker, settings: WorkerSettings, models: dict[str, LoadedModel]) -> None:
    """Subscribe the worker to its pool's jobs topic, batching as the pool's config says."""
    pool = settings.worker.pool
    batching = settings.pool.batching
    backoff_s = settings.retries.backoff.initial_ms / 1000.0

    @broker.subscriber(
        topics.jobs_topic(pool),
        group_id=group_id(pool),
        batch=True,
        max_records=batching.max_batch_size if batching.enabled else 1,
        batch_timeout_ms=IDLE_POLL_MS,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,  # committed below, only once every result is published
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title=f"run jobs of pool {pool}",
    )
    async def handle_jobs(message: KafkaMessage) -> None:
        """Run a batch; on any failure rewind to its first records so nothing is lost."""
        records = message.raw_message
        try:
            records = await top_up(message.consumer, records, batching)
            jobs = await parse_jobs(broker, records)
            results = await run_batch(jobs, models)
            await asyncio.gather(
                *(
                    publish_result(broker, result, job.request.reply_to)
                    for job, result in zip(jobs, results, strict=True)
                )
            )
        except Exception:
            logger.exception("batch failed; it will be redelivered in %.1f s", backoff_s)
            await asyncio.sleep(backoff_s)
            rewind(message.consumer, records)
            await message.nack()
            return
        await message.ack()


async def top_up(consumer: Any, records: tuple[ConsumerRecord, ...], batching: Batching) -> tuple[ConsumerRecord, ...]:
    """Dynamic batching: wait up to max_wait_ms for more jobs, until the batch holds max_batch_size.

    FastStream hands over what one poll returned; the rest of the window is polled here, on the
    same consumer, so the commit after the batch covers every record in it.
    """
    getmany = getattr(consumer, "getmany", None)  # absent on the in-memory test broker
    batch = list(records)
    if getmany is None or not batching.enabled:
        return records
    deadline = time.monotonic() + batching.max_wait_ms / 1000
    while len(batch) < batching.max_batch_size and (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        more = await getmany(timeout_ms=remaining_ms, max_records=batching.max_batch_size - len(batch))
        batch.extend(chain.from_iterable(more.values()))
    return tuple(batch)


def rewind(consumer: Any, records: tuple[ConsumerRecord, ...]) -> None:
    """Seek every partition of the batch back to its earliest record, so the batch is read again."""
    earliest: dict[TopicPartition, int] = {}
    for record in records:
        partition = TopicPartition(record.topic, record.partition)
        earliest[partition] = min(record.offset, earliest.get(partition, record.offset))
    for partition, offset in earliest.items():
        consumer.seek(partition, offset)


async def parse_jobs(broker: KafkaBroker, records: tuple[ConsumerRecord, ...]) -> list[RoutedJob]:
    """Valid jobs of a batch; anything else goes to the dead-letter topic with the reason."""
    jobs = []
    for record in records:
        try:
            jobs.append(RoutedJob.model_validate_json(record.value))
        except ValidationError as error:
            await publish_dead_letter(
                broker, service=SERVICE, source_topic=record.topic, body=record.value, error=error
            )
    return jobs
