"""The worker's subscriber: a batch of jobs in, one result per job out, then the commit."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel, run_batch
from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter, publish_result
from shared.messages import RoutedJob

logger = logging.getLogger(__name__)

SERVICE = "worker"


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
        batch_timeout_ms=batching.max_wait_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,  # committed below, only once every result is published
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title=f"run jobs of pool {pool}",
    )
    async def handle_jobs(message: KafkaMessage) -> None:
        """Run a batch; on any failure rewind to its first record so nothing is lost."""
        try:
            jobs = await parse_jobs(broker, message.raw_message)
            results = await run_batch(jobs, models)
            await asyncio.gather(
                *(publish_result(broker, result, job.request.reply_to) for job, result in zip(jobs, results, strict=True))
            )
        except Exception:
            logger.exception("batch failed; it will be redelivered in %.1f s", backoff_s)
            await asyncio.sleep(backoff_s)
            await message.nack()
            return
        await message.ack()


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
