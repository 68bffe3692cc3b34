"""The exporter's subscribers: batches of records from each topic family, stored, then committed.

Each family (requests, results, feedback, routing decisions, retries, dead letters, cancellations)
has its own consumer group, so offsets are committed only after that family's rows are in
PostgreSQL. Batches go through a short pipeline: while one is written (one write in flight per
family, in the order they came), the next ones are parsed and fetched; a batch's offsets, exactly
its own, are committed once its transaction has. While PostgreSQL is unreachable the write is
retried after a growing pause and nothing newer is written or committed (the exporter pauses,
nothing is lost); once it is back the backlog is stored, and the unique keys drop whatever a
redelivery repeats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterSettings
from services.exporter.metrics import ExporterMetrics
from services.exporter.parsing import (
    Family,
    ParsedBatch,
    RecordParser,
    stored_cancellation,
    stored_dead_letter,
    stored_feedback,
    stored_request,
    stored_result,
    stored_retry,
    stored_routing_decision,
)
from services.exporter.store import CopyRecord, copy_new
from shared import topics
from shared.db.tables import (
    CancellationRow,
    DeadLetterRow,
    FeedbackRow,
    RequestRow,
    ResultRow,
    RetryRow,
    RoutingDecisionRow,
)
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter
from shared.messages import CancelRequest, ChatRequest, ChatResult, DeadLetter, Feedback, RoutedJob
from shared.telemetry import record_context, timed_span

logger = logging.getLogger(__name__)

BATCHES_IN_FLIGHT = 3
"""Per family, batches taken from Kafka and not yet stored: one being written, the next ones being parsed.
Enough to keep the parsing process busy while a batch is written and the next is fetched; more would only
hold memory (and records to read again after a crash)."""


def families(settings: ExporterSettings) -> list[Family]:
    """Every topic family the exporter persists."""
    prefix = settings.exporter.group_prefix
    pools = list(settings.pools)
    jobs = [topic for pool in pools for topic in (topics.jobs_topic(pool), topics.priority_topic(pool))]
    return [
        # Groups of the first three keep their original names, so an upgraded exporter resumes where it was.
        Family("requests", [topics.REQUESTS], ChatRequest, RequestRow, stored_request, f"{prefix}-{topics.REQUESTS}"),
        Family("results", [topics.RESULTS], ChatResult, ResultRow, stored_result, f"{prefix}-{topics.RESULTS}"),
        Family("feedback", [topics.FEEDBACK], Feedback, FeedbackRow, stored_feedback, f"{prefix}-{topics.FEEDBACK}"),
        Family("routing_decisions", jobs, RoutedJob, RoutingDecisionRow, stored_routing_decision, f"{prefix}-jobs"),
        Family("retries", [topics.retry_topic(pool) for pool in pools], RoutedJob, RetryRow, stored_retry,
               f"{prefix}-retries"),
        Family("dead_letters", [topics.DEADLETTER], DeadLetter, DeadLetterRow, stored_dead_letter,
               f"{prefix}-{topics.DEADLETTER}", dead_letter_refused=False),
        # The control topic has no group of its own (every router and worker reads all of it): this one is ours.
        Family("cancellations", [topics.CONTROL], CancelRequest, CancellationRow, stored_cancellation,
               f"{prefix}-{topics.CONTROL}"),
    ]  # fmt: skip


@dataclass
class Backoff:
    """Exponential pause between attempts to store a batch while PostgreSQL fails; reset by a success."""

    initial_s: float
    max_s: float
    failures: int = field(default=0)

    def next_delay(self) -> float:
        self.failures += 1
        return min(self.initial_s * 2 ** (self.failures - 1), self.max_s)

    def reset(self) -> None:
        self.failures = 0


class Persister:
    """Stores the batches of each family: parse, build rows, write (one write in flight, in order), commit
    its offsets."""

    def __init__(
        self,
        broker: KafkaBroker,
        engine: AsyncEngine,
        settings: ExporterSettings,
        metrics: ExporterMetrics,
        service: str = "exporter",
    ) -> None:
        self.broker = broker
        self.parser = RecordParser(settings.exporter.parse_processes, service, settings.log_level, settings.log_format)
        self.engine = engine
        self.metrics = metrics
        self.initial_backoff_s = max(settings.retries.backoff.initial_ms / 1000.0, 0.05)
        self.max_backoff_s = settings.exporter.max_backoff_s
        self.in_flight: dict[str, deque[asyncio.Task[None]]] = {}  # per family, its batches' tasks, oldest first
        self.commits: dict[str, asyncio.Task[None]] = {}  # per family, the last offsets being committed
        self.closing = False

    def subscribe(self, family: Family, options: Any) -> None:
        """Subscribe to a family's topics under its group; commit only after the rows are stored."""
        backoff = Backoff(self.initial_backoff_s, self.max_backoff_s)
        for labelled in (self.metrics.rows_stored, self.metrics.rows_duplicate, self.metrics.store_failures):
            labelled.labels(family.name)  # every table's series exists from the start, at 0

        @self.broker.subscriber(
            *family.topics,
            group_id=family.group_id,
            batch=True,
            max_records=options.max_batch_size,
            batch_timeout_ms=options.max_wait_ms,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.MANUAL,  # committed by `write`, after the database commit
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            decoder=leave_undecoded,
            title=f"persist {family.name}",
        )
        async def persist(message: KafkaMessage) -> None:
            if self.closing:
                return  # not committed: the next exporter reads these records again
            records: tuple[ConsumerRecord, ...] = message.raw_message
            await self.pipeline(family, records, message.consumer, backoff)

    async def pipeline(
        self, family: Family, records: tuple[ConsumerRecord, ...], consumer: Any, backoff: Backoff
    ) -> None:
        """Start parsing a batch now, and write it after the family's previous batch; return as soon as fewer
        than BATCHES_IN_FLIGHT are unstored, so the next batch is fetched meanwhile."""
        queue = self.in_flight.setdefault(family.name, deque())
        parsing = asyncio.create_task(self.parser.rows(records, family))
        previous = queue[-1] if queue else None
        store = self.store_in_turn(family, records, parsing, previous=previous, consumer=consumer, backoff=backoff)
        queue.append(asyncio.create_task(store, name=f"persist {family.name}"))
        while len(queue) >= BATCHES_IN_FLIGHT or (queue and queue[0].done()):
            # Raises only if parsing did (a bug): then no later batch of the family commits either, as
            # that would claim this one's records.
            await queue.popleft()

    async def store_in_turn(
        self,
        family: Family,
        records: tuple[ConsumerRecord, ...],
        parsing: asyncio.Task[ParsedBatch],
        *,
        previous: asyncio.Task[None] | None,
        consumer: Any,
        backoff: Backoff,
    ) -> None:
        """Write a batch once it is parsed and the batch before it is stored (its offsets commit after
        that batch's, as Kafka offsets must)."""
        parsed = await parsing
        if previous is not None:
            await previous
        if self.closing:
            return  # not committed: the next exporter reads these records again
        await self.write(family, records, parsed, consumer, backoff)

    async def start(self) -> None:
        """Before the first batch: start the processes that parse records."""
        await self.parser.start()

    async def close(self, timeout_s: float) -> None:
        """On shutdown: start no new write, and let those in flight commit (those still retrying are cancelled:
        their records are read again on restart); then stop the parsing processes."""
        self.closing = True
        writes = [task for queue in self.in_flight.values() for task in queue]
        if writes:
            _, unfinished = await asyncio.wait(writes, timeout=timeout_s)
            for write in unfinished:
                write.cancel()
        if commits := list(self.commits.values()):
            await asyncio.wait(commits, timeout=timeout_s)
        await asyncio.to_thread(self.parser.close)

    async def write(
        self,
        family: Family,
        records: tuple[ConsumerRecord, ...],
        parsed: ParsedBatch,
        consumer: Any,
        backoff: Backoff,
    ) -> None:
        """Store a batch, retrying with a growing pause while PostgreSQL fails; then commit its offsets."""
        started_ns = time.time_ns()
        while True:
            try:
                await self.store_batch(family, parsed)
                break
            except Exception as error:
                delay = backoff.next_delay()
                self.metrics.store_failures.labels(family.name).inc()
                self.metrics.database_up.set(0)
                logger.warning(
                    "storing a batch of %s failed (%s: %s); trying again in %.1f s",
                    family.name, type(error).__name__, error, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
        backoff.reset()
        self.metrics.database_up.set(1)
        trace_persisted(records, f"persist {family.model.__name__}", started_ns)
        # The next batch may be written while these offsets travel to Kafka; commits stay in order.
        previous = self.commits.get(family.name)
        self.commits[family.name] = asyncio.create_task(commit_offsets(consumer, records, after=previous))

    async def store_batch(self, family: Family, parsed: ParsedBatch) -> int:
        """Store a batch in one transaction; if PostgreSQL refuses a row's data, store row by row."""
        try:
            return await self.insert(family, parsed.columns, [values for _, values in parsed.rows])
        except Exception as error:
            if not is_unstorable(error):
                raise
        logger.warning("a batch of %s holds an unstorable row; storing it row by row", family.name)
        inserted = 0
        for record, values in parsed.rows:
            try:
                inserted += await self.insert(family, parsed.columns, [values])
            except Exception as error:
                if not is_unstorable(error):
                    raise
                await self.refuse(family, record, parsed.request_id(values), error)
        return inserted

    async def insert(self, family: Family, columns: list[str], rows: list[CopyRecord]) -> int:
        """Insert and count: rows stored, duplicates skipped, time taken, batch size."""
        if not rows:
            return 0
        started = time.perf_counter()
        inserted = await copy_new(self.engine, family.table, columns, rows)
        self.metrics.store_seconds.labels(family.name).observe(time.perf_counter() - started)
        self.metrics.batch_rows.labels(family.name).observe(len(rows))
        self.metrics.rows_stored.labels(family.name).inc(inserted)
        self.metrics.rows_duplicate.labels(family.name).inc(len(rows) - inserted)
        return inserted

    async def refuse(self, family: Family, record: ConsumerRecord, request_id: str | None, error: Exception) -> None:
        """A row PostgreSQL will never take: dead-letter its message (a dead letter itself is only logged)."""
        if not family.dead_letter_refused:
            logger.error("dead letter at %s[%d]@%d cannot be stored: %s", record.topic, record.partition,
                         record.offset, error)  # fmt: skip
            return
        await publish_dead_letter(
            self.broker, service="exporter", source_topic=record.topic, body=record.value,
            error=error, request_id=request_id,
        )  # fmt: skip


async def commit_offsets(
    consumer: Any, records: tuple[ConsumerRecord, ...], after: asyncio.Task[None] | None = None
) -> None:
    """Commit exactly past this batch's records, once the commit `after` (the previous batch's) is done. The
    consumer's own position may be further on (the next batch is fetched while this one is written), so a
    plain commit() would claim records not yet stored."""
    if after is not None:
        await after  # never raises: a failed commit is logged
    if not isinstance(consumer, AIOKafkaConsumer):
        await consumer.commit()  # FastStream's in-memory test consumer: no positions to name
        return
    offsets: dict[TopicPartition, int] = {}
    for record in records:
        partition = TopicPartition(record.topic, record.partition)
        offsets[partition] = max(offsets.get(partition, 0), record.offset + 1)
    try:
        await consumer.commit(offsets)
    except KafkaError as error:
        # a rebalance took the partitions away: their new owner reads these records again, and the
        # unique keys drop the rows already stored
        logger.warning("offsets of a stored batch not committed (%s): its records will be read again", error)


def trace_persisted(records: tuple[ConsumerRecord, ...], name: str, started_ns: int) -> None:
    """A span per stored record in the trace it came with, timed as the batch's database write."""
    ended_ns = time.time_ns()
    for record in records:
        if not any(key == "traceparent" for key, _ in record.headers or ()):
            continue  # a producer that sends no trace context: a lone span would be a trace of its own
        context = record_context(record)
        if not trace.get_current_span(context).get_span_context().is_valid:
            continue
        key = record.key.decode("utf-8", errors="replace") if isinstance(record.key, bytes) else None
        attributes = {"messaging.destination.name": record.topic, "autoglm.record_key": key or ""}
        timed_span(name, context, started_ns, ended_ns, attributes=attributes)


def register_handlers(
    broker: KafkaBroker, settings: ExporterSettings, engine: AsyncEngine, metrics: ExporterMetrics
) -> Persister:
    """Subscribe the exporter to every topic family it persists."""
    persister = Persister(broker, engine, settings, metrics)
    for family in families(settings):
        persister.subscribe(family, settings.exporter)
    return persister


async def leave_undecoded(message: Any) -> None:
    """Skip FastStream's decoding of each record of a batch: `rows_of` parses them with their model anyway,
    and the wasted JSON decoding cost as much as the parsing itself."""
    return


def is_unstorable(error: BaseException) -> bool:
    """True when PostgreSQL refused the data itself, so retrying the same rows cannot help."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, asyncpg.exceptions.DataError | asyncpg.exceptions.IntegrityConstraintViolationError):
            return True
        cause = cause.__cause__
    return False
