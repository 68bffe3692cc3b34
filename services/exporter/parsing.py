"""Records to rows: parse and validate each record of a batch, then build its table row.

This is most of the exporter's CPU per row, so by default it runs in a worker process: the event
loop keeps fetching from Kafka, writing to PostgreSQL and committing offsets while the next batch
is parsed. Everything here is importable by that process (module-level functions, picklable
arguments); the `Family` a batch belongs to travels with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from operator import attrgetter
from typing import Any, TypeVar

from aiokafka import ConsumerRecord
from pydantic import BaseModel, ValidationError

from services.exporter.store import (
    CopyRecord,
    Row,
    cancellation_row,
    copy_records,
    dead_letter_row,
    feedback_row,
    request_row,
    result_row,
    retry_row,
    routing_decision_row,
    without_nul,
)
from shared.db.tables import Base
from shared.logging import setup_logging
from shared.messages import CancelRequest, ChatRequest, ChatResult, DeadLetter, Feedback, RoutedJob
from shared.service import tune_garbage_collector

logger = logging.getLogger(__name__)

MessageT = TypeVar("MessageT", bound=BaseModel)
# W3C trace context: version-traceid-parentid-flags, as FastStream's telemetry middleware writes it.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
record_fields = attrgetter(*(field.name for field in dataclasses.fields(ConsumerRecord)))


def fields_of(records: tuple[ConsumerRecord, ...]) -> list[tuple[Any, ...]]:
    """Records as sent to a worker process: plain tuples of their fields pickle in a third of a dataclass's time."""
    return list(map(record_fields, records))


RowOf = Callable[[ConsumerRecord, Any], Row | None]
"""The row of a parsed message, or None when it is not stored (probes). Module-level, so a worker process can
be sent it."""


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


def stored_request(record: ConsumerRecord, request: ChatRequest) -> Row | None:
    return None if request.probe else request_row(request, trace_id_of(record))


def stored_result(record: ConsumerRecord, result: ChatResult) -> Row | None:
    return None if result.probe else result_row(result)


def stored_feedback(record: ConsumerRecord, feedback: Feedback) -> Row | None:
    return feedback_row(feedback)


def stored_routing_decision(record: ConsumerRecord, job: RoutedJob) -> Row | None:
    return None if job.request.probe else routing_decision_row(job, record.topic)


def stored_retry(record: ConsumerRecord, job: RoutedJob) -> Row | None:
    return None if job.request.probe else retry_row(job, record)


def stored_dead_letter(record: ConsumerRecord, letter: DeadLetter) -> Row | None:
    return dead_letter_row(letter, record)


def stored_cancellation(record: ConsumerRecord, cancel: CancelRequest) -> Row | None:
    return cancellation_row(cancel)


@dataclass
class ParsedBatch:
    """A batch's rows as COPY takes them, each with the record it came from."""

    columns: list[str]
    rows: list[tuple[ConsumerRecord, CopyRecord]]

    def request_id(self, values: CopyRecord) -> str | None:
        """The request a row is about (every table but dead letters' has it)."""
        return values[self.columns.index("request_id")] if "request_id" in self.columns else None


class RecordParser:
    """Turns batches of records into rows, in `processes` worker processes (0: in the calling process)."""

    def __init__(self, processes: int, service: str, log_level: str = "INFO", log_format: str = "auto") -> None:
        self.processes = processes
        self.logging = (service, log_level, log_format)  # the service's, in its workers too
        self.pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker processes and wait until each has imported what it needs, so the first batch does
        not pay for it."""
        if self.processes == 0:
            return
        logger.info("starting %d process(es) to parse records", self.processes)
        self.pool = self.new_pool()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, ready) for _ in range(self.processes)))

    def new_pool(self) -> ProcessPoolExecutor:
        # forkserver: a fork of this process would copy its threads' locks (Kafka, asyncio) mid-use
        return ProcessPoolExecutor(
            self.processes, mp_context=get_context("forkserver"), initializer=prepare_worker, initargs=self.logging
        )

    async def rows(self, records: tuple[ConsumerRecord, ...], family: Family) -> ParsedBatch:
        """The rows of a batch's valid messages, each with its record."""
        if (pool := self.pool) is None:
            parts = [copied_rows(records, family)]
        else:
            try:
                parts = await self.in_workers(pool, records, family)
            except BrokenProcessPool:
                # a worker died (killed, out of memory): parse this batch here, and start new workers (once,
                # though every batch queued for the broken pool comes here)
                if self.pool is pool:
                    logger.warning("a record-parsing process died; starting new ones")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self.new_pool()
                parts = [copied_rows(records, family)]
        columns = next((columns for columns, rows in parts if rows), [])
        return ParsedBatch(columns, [(records[index], values) for _, rows in parts for index, values in rows])

    async def in_workers(
        self, pool: ProcessPoolExecutor, records: tuple[ConsumerRecord, ...], family: Family
    ) -> list[tuple[list[str], list[tuple[int, CopyRecord]]]]:
        """A batch cut into one part per worker process, parsed side by side (indices: of the whole batch)."""
        loop, size = asyncio.get_running_loop(), -(-len(records) // self.processes)
        parts = [
            loop.run_in_executor(pool, copied_rows_of_fields, fields_of(records[start : start + size]), family, start)
            for start in range(0, len(records), size)
        ]
        return list(await asyncio.gather(*parts))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def prepare_worker(service: str, log_level: str, log_format: str) -> None:
    """In a worker process: the service's logging, and signals left to the service (it stops its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(service, log_level, log_format)
    tune_garbage_collector()


def ready() -> bool:
    return True


def copied_rows(
    records: tuple[ConsumerRecord, ...], family: Family, first_index: int = 0
) -> tuple[list[str], list[tuple[int, CopyRecord]]]:
    """The rows of a batch's valid messages as COPY takes them (probes have none), NUL replaced: their columns,
    and each row with its record's index (from `first_index`). Indices, not records, come back from a worker
    process: the records are already in the service."""
    rows: list[tuple[int, Row]] = []
    for index, item in parse_all(records, family.model):
        record = records[index]
        row = family.row_of(record, item)
        if row is not None:
            rows.append((first_index + index, without_nul(row) if may_hold_nul(record) else row))
    if not rows:
        return [], []
    columns = list(rows[0][1])
    values = copy_records(family.table, columns, [row for _, row in rows])
    return columns, list(zip([index for index, _ in rows], values, strict=True))


def copied_rows_of_fields(
    fields: list[tuple[Any, ...]], family: Family, first_index: int
) -> tuple[list[str], list[tuple[int, CopyRecord]]]:
    """`copied_rows` of records sent to a worker process as `record_fields` tuples."""
    return copied_rows(tuple(ConsumerRecord(*values) for values in fields), family, first_index)


def parse_all(records: tuple[ConsumerRecord, ...], model: type[MessageT]) -> list[tuple[int, MessageT]]:
    """Valid messages of a batch with their indices. Invalid ones are skipped: their producer's consumers
    dead-letter them (the router for requests, ...), and a record nobody can read must not stop the exporter."""
    parsed = []
    for index, record in enumerate(records):
        try:
            parsed.append((index, model.model_validate_json(record.value)))
        except ValidationError as error:
            logger.warning(
                "skipping an invalid %s at %s[%d]@%d: %s",
                model.__name__, record.topic, record.partition, record.offset, error.error_count(),
            )  # fmt: skip
    return parsed


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
