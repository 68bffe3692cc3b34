"""Idempotent batched writes: a redelivered message never duplicates a row."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.tables import RequestRow, ResultRow
from shared.messages import ChatRequest, ChatResult


def without_nul(value: Any) -> Any:
    """PostgreSQL text and JSONB cannot hold U+0000, which model output and user input may contain."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {key: without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    return value


def request_row(request: ChatRequest) -> dict[str, Any]:
    """The `requests` row of a chat request."""
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
        "created_at": result.created_at,
        "completed_at": result.completed_at,
    }


async def store_requests(engine: AsyncEngine, requests: list[ChatRequest]) -> int:
    """Insert requests in one statement, skipping ids already stored; returns rows inserted."""
    return await _insert_new(engine, RequestRow, [request_row(r) for r in requests])


async def store_results(engine: AsyncEngine, results: list[ChatResult]) -> int:
    """Insert results in one statement, skipping ids already stored; returns rows inserted."""
    return await _insert_new(engine, ResultRow, [result_row(r) for r in results])


async def _insert_new(
    engine: AsyncEngine, table: type[RequestRow] | type[ResultRow], rows: list[dict[str, Any]]
) -> int:
    if not rows:
        return 0
    unique = [without_nul(row) for row in {row["request_id"]: row for row in rows}.values()]  # ids may repeat
    statement = insert(table).values(unique).on_conflict_do_nothing(index_elements=["request_id"])
    async with engine.begin() as connection:
        outcome = await connection.execute(statement)
    return outcome.rowcount or 0
