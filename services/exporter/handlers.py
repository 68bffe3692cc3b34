"""The exporter's subscribers: batches of records from each topic family, stored, then committed.

Each family (requests, results, feedback, routing decisions, retries, dead letters, cancellations)
has its own consumer group, so offsets are committed only after that family's rows are in
PostgreSQL. A batch is written while the next one is parsed (one write in flight per family), and
its offsets, exactly its own, are committed once its transaction has. While PostgreSQL is
unreachable the write is retried after a growing pause and nothing newer is written or committed
(the exporter pauses, nothing is lost); once it is back the backlog is stored, and the unique keys
drop whatever a redelivery repeats.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterSettings
from services.exporter.metrics import ExporterMetrics
from services.exporter.store import (
    Row,
    cancellation_row,
    dead_letter_row,
    feedback_row,
    insert_new,
    request_row,
    result_row,
    retry_row,
    routing_decision_row,
    without_nul,
)
from shared import topics
from shared.db.tables import (
    Base,
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

MessageT = TypeVar("MessageT", bound=BaseModel)
# W3C trace context: version-traceid-parentid-flags, as FastStream's telemetry middleware writes it.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
RowOf = Callable[[ConsumerRecord, Any], Row | None]
"""The row of a parsed message, or None when it is not stored (probes)."""


@dataclass(frozen=True)
class Family:
    """Topics whose messages (all one schema) become rows of one table, under one consumer group."""

    name: str
    topics: list[str]
    model: type[BaseModel]
    table: type[Base]
    row_of: RowOf
    group_id: str
    dead_letter_refused: bool = True  # False for dead letters themselves: that would loop


def families(settings: ExporterSettings) -> list[Family]:
    """Every topic family the exporter persists."""
    prefix = settings.exporter.group_prefix
    pools = list(settings.pools)
    jobs = [topic for pool in pools for topic in (topics.jobs_topic(pool), topics.priority_topic(pool))]
    return [
        # Groups of the first three keep their original names, so an upgraded exporter resumes where it was.
        Family("requests", [topics.REQUESTS], ChatRequest, RequestRow,
               lambda record, request: None if request.probe else request_row(request, trace_id_of(record)),
               f"{prefix}-{topics.REQUESTS}"),
        Family("results", [topics.RESULTS], ChatResult, ResultRow,
               lambda record, result: None if result.probe else result_row(result), f"{prefix}-{topics.RESULTS}"),
        Family("feedback", [topics.FEEDBACK], Feedback, FeedbackRow,
               lambda record, feedback: feedback_row(feedback), f"{prefix}-{topics.FEEDBACK}"),
        Family("routing_decisions", jobs, RoutedJob, RoutingDecisionRow,
               lambda record, job: None if job.request.probe else routing_decision_row(job, record.topic),
               f"{prefix}-jobs"),
        Family("retries", [topics.retry_topic(pool) for pool in pools], RoutedJob, RetryRow,
               lambda record, job: None if job.request.probe else retry_row(job, record), f"{prefix}-retries"),
        Family("dead_letters", [topics.DEADLETTER], DeadLetter, DeadLetterRow,
               lambda record, letter: dead_letter_row(letter, record), f"{prefix}-{topics.DEADLETTER}",
               dead_letter_refused=False),
        # The control topic has no group of its own (every router and worker reads all of it): this one is ours.
        Family("cancellations", [topics.CONTROL], CancelRequest, CancellationRow,
               lambda record, cancel: cancellation_row(cancel), f"{prefix}-{topics.CONTROL}"),
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
    """Stores the batches of each family: parse, build rows, write (one write in flight), commit its offsets."""

    def __init__(
        self, broker: KafkaBroker, engine: AsyncEngine, settings: ExporterSettings, metrics: ExporterMetrics
    ) -> None:
        self.broker = broker
        self.engine = engine
        self.metrics = metrics
        self.initial_backoff_s = max(settings.retries.backoff.initial_ms / 1000.0, 0.05)
        self.max_backoff_s = settings.exporter.max_backoff_s
        self.writes: dict[str, asyncio.Task[None]] = {}  # per family, the batch being written
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
            records: tuple[ConsumerRecord, ...] = message.raw_message
            items = rows_of(records, family)  # parsed while the previous batch is still being written
            await self.finish_write(family.name)
            if self.closing:
                return  # not committed: the next exporter reads these records again
            write = self.write(family, records, items, message.consumer, backoff)
            self.writes[family.name] = asyncio.create_task(write, name=f"persist {family.name}")

    async def finish_write(self, name: str) -> None:
        """Wait for a family's write in flight, if any (it never raises: it retries until stored)."""
        if (write := self.writes.pop(name, None)) is not None:
            await write

    async def close(self, timeout_s: float) -> None:
        """On shutdown: start no new write, and let those in flight commit (those still retrying are cancelled:
        their records are read again on restart)."""
        self.closing = True
        writes = list(self.writes.values())
        if writes:
            _, unfinished = await asyncio.wait(writes, timeout=timeout_s)
            for write in unfinished:
                write.cancel()
        if commits := list(self.commits.values()):
            await asyncio.wait(commits, timeout=timeout_s)

    async def write(
        self,
        family: Family,
        records: tuple[ConsumerRecord, ...],
        items: list[tuple[ConsumerRecord, Row]],
        consumer: Any,
        backoff: Backoff,
    ) -> None:
        """Store a batch, retrying with a growing pause while PostgreSQL fails; then commit its offsets."""
        started_ns = time.time_ns()
        while True:
            try:
                await self.store_batch(family, items)
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

    async def store_batch(self, family: Family, items: list[tuple[ConsumerRecord, Row]]) -> int:
        """Store a batch in one transaction; if PostgreSQL refuses a row's data, store row by row."""
        try:
            return await self.insert(family, [row for _, row in items])
        except Exception as error:
            if not is_unstorable(error):
                raise
        logger.warning("a batch of %s holds an unstorable row; storing it row by row", family.name)
        inserted = 0
        for record, row in items:
            try:
                inserted += await self.insert(family, [row])
            except Exception as error:
                if not is_unstorable(error):
                    raise
                await self.refuse(family, record, row, error)
        return inserted

    async def insert(self, family: Family, rows: list[Row]) -> int:
        """Insert and count: rows stored, duplicates skipped, time taken, batch size."""
        if not rows:
            return 0
        started = time.perf_counter()
        inserted = await insert_new(self.engine, family.table, rows)
        self.metrics.store_seconds.labels(family.name).observe(time.perf_counter() - started)
        self.metrics.batch_rows.labels(family.name).observe(len(rows))
        self.metrics.rows_stored.labels(family.name).inc(inserted)
        self.metrics.rows_duplicate.labels(family.name).inc(len(rows) - inserted)
        return inserted

    async def refuse(self, family: Family, record: ConsumerRecord, row: Row, error: Exception) -> None:
        """A row PostgreSQL will never take: dead-letter its message (a dead letter itself is only logged)."""
        if not family.dead_letter_refused:
            logger.error("dead letter at %s[%d]@%d cannot be stored: %s", record.topic, record.partition,
                         record.offset, error)  # fmt: skip
            return
        request_id = row.get("request_id")  # every message the exporter stores is about a request
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


def rows_of(records: tuple[ConsumerRecord, ...], family: Family) -> list[tuple[ConsumerRecord, Row]]:
    """The rows of a batch's valid messages, with their records (probes have none), NUL replaced."""
    rows = []
    for record, item in parse_all(records, family.model):
        row = family.row_of(record, item)
        if row is not None:
            rows.append((record, without_nul(row) if may_hold_nul(record) else row))
    return rows


def may_hold_nul(record: ConsumerRecord) -> bool:
    """Whether a record could give a row text with U+0000. JSON can only carry it escaped (a bare control
    character is invalid JSON), so one scan of the bytes spares almost every row a walk through its values."""
    return b"\\u0000" in record.value or any(value and b"\x00" in value for _, value in record.headers or ())


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
    """Valid messages of a batch with their records. Invalid ones are skipped: their producer's consumers
    dead-letter them (the router for requests, ...), and a record nobody can read must not stop the exporter."""
    parsed = []
    for record in records:
        try:
            parsed.append((record, model.model_validate_json(record.value)))
        except ValidationError as error:
            logger.warning(
                "skipping an invalid %s at %s[%d]@%d: %s",
                model.__name__, record.topic, record.partition, record.offset, error.error_count(),
            )  # fmt: skip
    return parsed
