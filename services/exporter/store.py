"""Idempotent batched writes: rows are COPied into their table; a batch holding a stored key goes through a
staging table and INSERT ... ON CONFLICT DO NOTHING.

COPY is PostgreSQL's fastest way in; the staging table keeps most of its speed while letting the
unique keys drop what is already stored, so a redelivered message never duplicates a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

import asyncpg
from aiokafka import ConsumerRecord
from pydantic_core import to_json
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

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
from shared.messages import CancelRequest, ChatRequest, ChatResult, DeadLetter, Feedback, RoutedJob

Row = dict[str, Any]
CopyRecord = tuple[Any, ...]
"""A row as COPY takes it: its values in the order of the batch's columns, JSON as text."""


def without_nul(value: Any) -> Any:
    """PostgreSQL text and JSONB cannot hold U+0000, which model output and user input may contain."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {key: without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


def request_row(request: ChatRequest, trace_id: str | None = None) -> Row:
    """The `requests` row of a chat request (`trace_id`: of the trace it was published in)."""
    return {
        "request_id": request.request_id,
        "created_at": request.created_at,
        "deadline": request.deadline,
        "model": request.model,
        "caller": request.caller,
        "end_user": request.user,
        "priority": request.priority,
        "messages": [message.model_dump() for message in request.messages],
        "params": request.model_dump(
            mode="json", include={"max_tokens", "temperature", "top_p", "stop", "seed", "reply_to"}
        ),
        "trace_id": trace_id,
    }


def result_row(result: ChatResult) -> Row:
    """The `results` row of a chat result."""
    choice = result.choices[0] if result.choices else None
    return {
        "request_id": result.request_id,
        "status": "ok" if result.ok else "error",
        "model": result.model,
        "pool": result.pool,
        "score": result.score,
        "content": choice.message.content if choice else None,
        "finish_reason": choice.finish_reason if choice else None,
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "queue_ms": result.timings.queue_ms,
        "inference_ms": result.timings.inference_ms,
        "total_ms": result.timings.total_ms,
        "batch_size": result.timings.batch_size,
        "error_type": result.error.type if result.error else None,
        "error_code": result.error.code if result.error else None,
        "error_message": result.error.message if result.error else None,
        "attempts": result.attempts,
        "reasons": result.reasons,
        "routing": result.routing.model_dump(mode="json") if result.routing else None,
        "created_at": result.created_at,
        "completed_at": result.completed_at,
    }


def feedback_row(feedback: Feedback) -> Row:
    """The `feedback` row of a client's feedback."""
    return feedback.model_dump(include={"feedback_id", "request_id", "score", "comment", "caller", "created_at"})


def routing_decision_row(job: RoutedJob, topic: str) -> Row:
    """The `routing_decisions` row of a job the router published to `topic`."""
    return {
        "request_id": job.request_id,
        "pool": job.pool,
        "model": job.model,
        "lane": "priority" if topic.endswith(topics.PRIORITY_SUFFIX) else "normal",
        "score": job.score,
        "policy": job.routing.policy if job.routing else None,
        "reasons": job.reasons,
        "routing": job.routing.model_dump(mode="json") if job.routing else None,
        "routed_at": job.routed_at,
    }


def retry_row(job: RoutedJob, record: ConsumerRecord) -> Row:
    """The `retries` row of a job a worker put on its pool's retry topic (attempt and reason in headers)."""
    headers = {key: value.decode("utf-8", errors="replace") for key, value in record.headers or ()}
    not_before_ms = headers.get(topics.NOT_BEFORE_HEADER, "")
    attempt = headers.get(topics.ATTEMPT_HEADER, "")
    return {
        "request_id": job.request_id,
        "attempt": int(attempt) if attempt.isdigit() else 2,  # a retry record without the header: the first retry
        "pool": job.pool,
        "model": job.model,
        "error": headers.get(topics.RETRY_ERROR_HEADER),
        "not_before": from_unix_ms(int(not_before_ms)) if not_before_ms.isdigit() else None,
        "scheduled_at": from_unix_ms(record.timestamp),
    }


def dead_letter_row(letter: DeadLetter, record: ConsumerRecord) -> Row:
    """The `dead_letters` row of a dead letter, keyed by its position on the topic (it has no id)."""
    return {
        "kafka_partition": record.partition,
        "kafka_offset": record.offset,
        "request_id": letter.request_id[:128] if letter.request_id else None,  # unchecked: the payload was bad
        "source_topic": letter.source_topic[:255],
        "service": letter.service[:100],
        "error_type": letter.error_type[:200],
        "reason": letter.reason,
        "attempts": letter.attempts,
        "payload": letter.payload,
        "failed_at": letter.failed_at,
    }


def cancellation_row(cancel: CancelRequest) -> Row:
    """The `cancellations` row of a cancel request."""
    return {
        "request_id": cancel.request_id,
        "reason": cancel.reason,
        "requested_by": cancel.requested_by,
        "created_at": cancel.created_at,
    }


def from_unix_ms(milliseconds: int) -> datetime:
    """A UTC datetime from Unix milliseconds (Kafka timestamps and our not-before header)."""
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


def json_columns(table: type[Base]) -> frozenset[str]:
    """Columns of a JSON type: COPY takes them as serialised text."""
    return frozenset(column.name for column in table.__table__.columns if isinstance(column.type, JSONB))


def encode_json(value: Any) -> str | None:
    """JSON text, as COPY takes a JSONB value (serialised by pydantic-core: a fifth of `json.dumps`'s time)."""
    return None if value is None else to_json(value).decode()


def copy_records(table: type[Base], columns: list[str], rows: Sequence[Row]) -> list[CopyRecord]:
    """The rows as COPY takes them: a tuple per row in `columns` order, JSON columns as text."""
    values_of = itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
    json_names = json_columns(table)
    as_json = [index for index, column in enumerate(columns) if column in json_names]
    if not as_json:
        return [values_of(row) for row in rows]
    records = []
    for row in rows:
        values = list(values_of(row))
        for index in as_json:
            values[index] = encode_json(values[index])
        records.append(tuple(values))
    return records


async def copy_new(engine: AsyncEngine, table: type[Base], columns: list[str], records: list[CopyRecord]) -> int:
    """Insert `records` (`copy_records`), skipping keys already stored or repeated; returns rows inserted.
    Atomic. Their text must hold no NUL, which PostgreSQL refuses (`without_nul`).

    The records are COPied straight into the table: almost always none is stored yet. When one is (a
    redelivery), that COPY fails as a whole and the records go through a staging table and
    INSERT ... ON CONFLICT DO NOTHING instead (which also keeps the first of keys repeated in the batch).
    """
    if not records:
        return 0
    name = table.__tablename__
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None  # an open pooled connection always has its asyncpg connection
        try:
            await driver.copy_records_to_table(name, records=records, columns=columns)  # one statement: atomic
            return len(records)
        except asyncpg.exceptions.UniqueViolationError:
            pass  # some of these rows are stored already
        staging, column_list = f"staging_{name}", ", ".join(columns)
        async with driver.transaction():
            await driver.execute(
                f"CREATE TEMP TABLE {staging} ON COMMIT DROP AS SELECT {column_list} FROM {name} WITH NO DATA"
            )
            await driver.copy_records_to_table(staging, records=records, columns=columns)
            status = await driver.execute(
                f"INSERT INTO {name} ({column_list}) SELECT {column_list} FROM {staging} ON CONFLICT DO NOTHING"
            )
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"


TABLES_BY_NAME: dict[str, type[Base]] = {
    table.__tablename__: table
    for table in (RequestRow, ResultRow, FeedbackRow, RoutingDecisionRow, RetryRow, DeadLetterRow, CancellationRow)
}
"""Every table the exporter writes."""
