"""The worker's subscribers: batches of jobs in, one result per job out, then the commit.

A job whose backend fails for a reason that may pass goes to the pool's retry topic with its
attempt count and a not-before time in the headers; the retry subscriber runs it again after an
exponential backoff with jitter. After `retries.max_attempts` it is dead-lettered and its caller
gets an error result. Bad input is answered at once and never retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from itertools import chain
from typing import Any

from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from services.worker.config import WorkerSettings
from services.worker.execution import JobFailure, LoadedModel, Outcome, exhausted_result, run_batch
from services.worker.metrics import WorkerMetrics
from services.worker.streaming import StreamRelay
from services.worker.tracing import job_span, record_outcome
from shared import topics
from shared.cancellation import CancelledRequests
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter, publish_result, rewind
from shared.messages import RoutedJob
from shared.settings import Batching, RetryConfig
from shared.telemetry import in_trace, record_context

logger = logging.getLogger(__name__)

SERVICE = "worker"
IDLE_POLL_MS = 5  # how long an idle poll blocks; FastStream also sleeps this long after an empty one
ATTEMPT_HEADER = topics.ATTEMPT_HEADER
NOT_BEFORE_HEADER = topics.NOT_BEFORE_HEADER


def group_id(pool: str) -> str:
    """Consumer group shared by every replica of a pool."""
    return topics.worker_group(pool)


def register_handlers(
    broker: KafkaBroker, settings: WorkerSettings, models: dict[str, LoadedModel], metrics: WorkerMetrics
) -> None:
    """Subscribe the worker to its pool's jobs topic (batched) and retry topic (one at a time)."""
    pool = settings.worker.pool
    batching = settings.pool.batching
    settle = Settler(broker, pool, settings.retries)
    cancelled = CancelledRequests()
    cancelled.subscribe(broker, f"{SERVICE}-{pool}")

    async def run_and_settle(records: tuple[ConsumerRecord, ...]) -> None:
        jobs = await parse_jobs(broker, records)
        relay = StreamRelay(broker, [(job, record) for job, _, record in jobs])
        taken_ns = time.time_ns()
        outcomes = await run_batch([job for job, _, _ in jobs], models, cancelled, relay)
        await relay.flush()  # every chunk before its result, on the same partition
        metrics.observe(pool, outcomes)
        await asyncio.gather(
            *(
                settle_traced(record, job, outcome, attempt=attempt, taken_ns=taken_ns, batch_size=len(jobs))
                for (job, attempt, record), outcome in zip(jobs, outcomes, strict=True)
            )
        )

    async def settle_traced(
        record: ConsumerRecord, job: RoutedJob, outcome: Outcome, *, attempt: int, taken_ns: int, batch_size: int
    ) -> None:
        """Settle in the job's own trace, so its result carries that trace on to the exporter and the caller."""
        with job_span(record, job, attempt, taken_ns) as span:
            label = record_outcome(span, outcome)
            await settle(job, outcome, attempt)
            logger.info("job settled: %s (attempt %d, batch of %d)", label, attempt, batch_size)

    async def process(message: KafkaMessage, records: tuple[ConsumerRecord, ...]) -> None:
        """Run records (priority lane first) and settle every outcome; on any failure rewind so nothing is lost."""
        try:
            for lane in split_lanes(records):
                await run_and_settle(lane)
        except Exception:
            logger.exception("batch failed; it will be redelivered in %.1f s", settle.backoff_s(1))
            await asyncio.sleep(settle.backoff_s(1))
            rewind(message.consumer, records)
            await message.nack()
            return
        await message.ack()

    @broker.subscriber(
        topics.priority_topic(pool),  # one consumer for both lanes: one commit covers the whole batch
        topics.jobs_topic(pool),
        group_id=group_id(pool),
        batch=True,
        max_records=batching.max_batch_size if batching.enabled else 1,
        batch_timeout_ms=IDLE_POLL_MS,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,  # committed in process(), only once every outcome is published
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title=f"run jobs of pool {pool}",
    )
    async def handle_jobs(message: KafkaMessage) -> None:
        """Top the batch up to the batching window, take every urgent job already fetched, then run it."""
        records: tuple[ConsumerRecord, ...] = message.raw_message
        try:
            records = await top_up(message.consumer, records, batching)
            records = await with_fetched_priority_jobs(message.consumer, records, pool)
        except Exception:
            logger.exception("polling for more jobs failed; running the batch as it is")
        await process(message, records)

    @broker.subscriber(
        topics.retry_topic(pool),
        group_id=topics.worker_retry_group(pool),
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        max_poll_interval_ms=max(300_000, 2 * settings.retries.backoff.max_ms),
        title=f"retry jobs of pool {pool}",
    )
    async def retry_job(message: KafkaMessage) -> None:
        """Wait until the job's not-before time, then run it again."""
        record: ConsumerRecord = message.raw_message
        await asyncio.sleep(max(0.0, header_int(record, NOT_BEFORE_HEADER, 0) / 1000 - time.time()))
        await process(message, (record,))


class Settler:
    """Publishes what became of a job: its result, another attempt, or a dead letter."""

    def __init__(self, broker: KafkaBroker, pool: str, retries: RetryConfig) -> None:
        self.broker = broker
        self.pool = pool
        self.retries = retries

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: half fixed, half random, so retries spread out."""
        backoff = self.retries.backoff
        delay_ms = min(backoff.initial_ms * backoff.multiplier ** (attempt - 1), backoff.max_ms)
        return (delay_ms / 2 + random.uniform(0, delay_ms / 2)) / 1000

    async def __call__(self, job: RoutedJob, outcome: Outcome, attempt: int) -> None:
        if not isinstance(outcome, JobFailure):
            outcome.attempts = attempt
            await publish_result(self.broker, outcome, job.request.reply_to)
        elif attempt < self.retries.max_attempts:
            await self.retry_later(job, outcome.error, attempt)
        else:
            await self.give_up(job, outcome.error, attempt)

    async def retry_later(self, job: RoutedJob, error: Exception, attempt: int) -> None:
        delay_s = self.backoff_s(attempt)
        headers = {
            ATTEMPT_HEADER: str(attempt + 1),
            NOT_BEFORE_HEADER: str(int((time.time() + delay_s) * 1000)),
            topics.RETRY_ERROR_HEADER: f"{type(error).__name__}: {error}"[:500],  # stored by the exporter
        }
        await self.broker.publish(job, topics.retry_topic(self.pool), key=job.request_id.encode(), headers=headers)
        logger.warning(
            "attempt %d of %s failed (%s: %s); retrying in %.2f s",
            attempt, job.request_id, type(error).__name__, error, delay_s,
        )  # fmt: skip

    async def give_up(self, job: RoutedJob, error: Exception, attempts: int) -> None:
        await publish_dead_letter(
            self.broker, service=SERVICE, source_topic=topics.jobs_topic(self.pool),
            body=job.model_dump_json().encode(), error=error, request_id=job.request_id, attempts=attempts,
        )  # fmt: skip
        await publish_result(self.broker, exhausted_result(job, attempts, error), job.request.reply_to)


def header_int(record: ConsumerRecord, name: str, default: int) -> int:
    """An integer header of a record, or `default`."""
    for key, value in record.headers or ():
        if key == name:
            try:
                return int(value)
            except ValueError:
                return default
    return default


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


def split_lanes(records: tuple[ConsumerRecord, ...]) -> list[tuple[ConsumerRecord, ...]]:
    """The batch as (priority jobs, normal jobs), leaving out an empty lane: urgent work runs first."""
    urgent = tuple(record for record in records if record.topic.endswith(topics.PRIORITY_SUFFIX))
    normal = tuple(record for record in records if not record.topic.endswith(topics.PRIORITY_SUFFIX))
    return [lane for lane in (urgent, normal) if lane]


async def with_fetched_priority_jobs(
    consumer: Any, records: tuple[ConsumerRecord, ...], pool: str
) -> tuple[ConsumerRecord, ...]:
    """Add the priority jobs the consumer has already fetched, so they do not wait for another batch."""
    getmany = getattr(consumer, "getmany", None)  # absent on the in-memory test broker
    if getmany is None:
        return records
    urgent = [partition for partition in consumer.assignment() if partition.topic == topics.priority_topic(pool)]
    if not urgent:
        return records
    more = await getmany(*urgent, timeout_ms=0)
    return records + tuple(chain.from_iterable(more.values()))


async def parse_jobs(
    broker: KafkaBroker, records: tuple[ConsumerRecord, ...]
) -> list[tuple[RoutedJob, int, ConsumerRecord]]:
    """Valid jobs of a batch with their attempt numbers and records; anything else is dead-lettered with the reason."""
    jobs = []
    for record in records:
        try:
            job = RoutedJob.model_validate_json(record.value)
            jobs.append((job, header_int(record, ATTEMPT_HEADER, 1), record))
        except ValidationError as error:
            with in_trace(record_context(record)):
                await publish_dead_letter(
                    broker, service=SERVICE, source_topic=record.topic, body=record.value, error=error
                )
    return jobs
