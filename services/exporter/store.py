"""Idempotent batched writes: a redelivered message never duplicates a row."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.tables import FeedbackRow, RequestRow, ResultRow
from shared.messages import ChatRequest, ChatResult, Feedback


def without_nul(value: Any) -> Any:
    """PostgreSQL text and JSONB cannot hold U+0000, which model output and user input may contain."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {key: without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


def request_row(request: ChatRequest, trace_id: str | None = None) -> dict[str, Any]:
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


def result_row(result: ChatResult) -> dict[str, Any]:
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


def feedback_row(feedback: Feedback) -> dict[str, Any]:
    """The `feedback` row of a client's feedback."""
    return feedback.model_dump(include={"feedback_id", "request_id", "score", "comment", "caller", "created_at"})


async def store_requests(
    engine: AsyncEngine, requests: list[ChatRequest], trace_ids: list[str | None] | None = None
) -> int:
    """Insert requests in one statement, skipping ids already stored; returns rows inserted."""
    traces = trace_ids if trace_ids is not None else [None] * len(requests)
    rows = [request_row(request, trace) for request, trace in zip(requests, traces, strict=True)]
    return await _insert_new(engine, RequestRow, rows)


async def store_results(engine: AsyncEngine, results: list[ChatResult]) -> int:
    """Insert results in one statement, skipping ids already stored; returns rows inserted."""
    return await _insert_new(engine, ResultRow, [result_row(r) for r in results])


async def store_feedback(engine: AsyncEngine, feedback: list[Feedback]) -> int:
    """Insert feedback in one statement, skipping ids already stored; returns rows inserted."""
    return await _insert_new(engine, FeedbackRow, [feedback_row(f) for f in feedback], key="feedback_id")


async def _insert_new(
    engine: AsyncEngine,
    table: type[RequestRow] | type[ResultRow] | type[FeedbackRow],
    rows: list[dict[str, Any]],
    key: str = "request_id",
) -> int:
    if not rows:
        return 0
    unique = [without_nul(row) for row in {row[key]: row for row in rows}.values()]  # ids may repeat
    statement = insert(table).values(unique).on_conflict_do_nothing(index_elements=[key])
    async with engine.begin() as connection:
        outcome = await connection.execute(statement)
    return outcome.rowcount or 0
