"""Where a request is: status, routing, attempts, trace and result, read from PostgreSQL.

The exporter stores every request and every result, whoever published them (this gateway, another
one, or a producer writing straight to Kafka), so PostgreSQL is the one place that knows them all.
It writes in batches: a request is visible here a few hundred milliseconds after it was published.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.errors import ApiError
from services.gateway.protocol import ChatCompletionResponse, ErrorInfo
from shared.db import storable
from shared.db.tables import RequestRow, ResultRow
from shared.messages import ChatMessage, ChatResult, Choice, RoutingExplanation, RoutingPolicy, Timings, Usage
from shared.messages import ErrorInfo as ResultError

logger = logging.getLogger(__name__)

RequestState = Literal["queued", "completed", "failed", "cancelled", "expired"]


class RequestAccepted(BaseModel):
    """`POST /v1/chat/completions` with `Prefer: respond-async`: the request is on its way (202)."""

    id: str
    object: Literal["chat.completion.request"] = "chat.completion.request"
    status: RequestState = "queued"
    created: int


class Routing(BaseModel):
    """The router's decision for a request, with its explanation (None for results stored before 0004)."""

    pool: str | None = None
    model: str | None = Field(default=None, description="The model that served it.")
    score: float | None = Field(default=None, description="Complexity score in [0, 1].")
    reasons: list[str] = Field(default_factory=list)
    policy: RoutingPolicy | None = Field(default=None, description="The routing policy that decided.")
    threshold: float | None = Field(default=None, description="The threshold the score was compared with.")
    contributions: dict[str, float] = Field(default_factory=dict, description="Each feature's contribution.")
    scored_pool: str | None = Field(default=None, description="The pool the score or the request asked for.")
    lane: Literal["normal", "priority"] | None = None
    notes: list[str] = Field(default_factory=list, description="What else the router saw (lag, breakers).")

    @classmethod
    def of(cls, result: ChatResult) -> Routing:
        """The routing object of a stored result."""
        routing = cls(pool=result.pool, model=result.model, score=result.score, reasons=result.reasons)
        if result.routing is not None:
            explained = result.routing.model_dump(exclude={"pool", "score"})
            routing = routing.model_copy(update=explained)
            routing.score = result.score if result.score is not None else result.routing.score
        return routing


class RequestStatus(BaseModel):
    """`GET /v1/requests/{id}`: a request as PostgreSQL knows it."""

    id: str
    object: Literal["request"] = "request"
    status: RequestState = Field(description="`queued` until a result is stored (it may already be running).")
    model: str | None = Field(default=None, description="The model asked for (e.g. `auto`).")
    created_at: datetime | None = None
    completed_at: datetime | None = None
    routing: Routing | None = Field(default=None, description="Known once the result is stored.")
    attempts: int | None = Field(default=None, description="Worker attempts it took; known once completed.")
    trace_id: str | None = Field(default=None, description="W3C trace id it was published in (None: no trace).")
    result: ChatCompletionResponse | None = Field(default=None, description="The completion, when completed.")
    error: ErrorInfo | None = Field(default=None, description="Why not, when failed, cancelled or expired.")


@dataclass(frozen=True)
class StoredRequest:
    """A request's rows; either may be missing (not stored yet, or refused by the database)."""

    request: RowMapping | None
    result: RowMapping | None


@contextmanager
def store_errors_as_503() -> Iterator[None]:
    """PostgreSQL unreachable: a 503 the client may retry, not a 500."""
    try:
        yield
    except (SQLAlchemyError, OSError) as error:
        logger.warning("reading PostgreSQL failed: %s: %s", type(error).__name__, error)
        raise ApiError(
            503, "The request store is unavailable, retry later", "server_error", None, "unavailable"
        ) from error


async def fetch_request(engine: AsyncEngine, request_id: str, owner: str | None = None) -> StoredRequest | None:
    """The stored rows of `request_id`; None when unknown, or when `owner` is given and is not its caller."""
    if not storable(request_id):
        return None
    with store_errors_as_503():
        async with engine.connect() as connection:
            request = (await connection.execute(select(RequestRow.__table__).filter_by(request_id=request_id))).first()
            result = (await connection.execute(select(ResultRow.__table__).filter_by(request_id=request_id))).first()
    stored = StoredRequest(request._mapping if request else None, result._mapping if result else None)
    if stored.request is None and stored.result is None:
        return None
    if owner is not None and (stored.request is None or stored.request["caller"] != owner):
        return None  # someone else's request looks exactly like an unknown one
    return stored


def result_from_row(row: RowMapping) -> ChatResult:
    """The ChatResult a `results` row was stored from (what a waiting client received)."""
    error = None
    if row["status"] != "ok":
        error = ResultError(
            type=row["error_type"] or "server_error", code=row["error_code"], message=row["error_message"] or ""
        )
    choices = []
    if row["content"] is not None:
        choices = [
            Choice(
                message=ChatMessage(role="assistant", content=row["content"]),
                finish_reason=row["finish_reason"] or "stop",
            )
        ]
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    return ChatResult(
        request_id=row["request_id"],
        model=row["model"],
        pool=row["pool"],
        score=row["score"],
        choices=choices,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
        timings=Timings(
            queue_ms=row["queue_ms"],
            inference_ms=row["inference_ms"],
            total_ms=row["total_ms"],
            batch_size=row["batch_size"],
        ),
        error=error,
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        attempts=row["attempts"],
        reasons=row["reasons"] or [],
        routing=RoutingExplanation.model_validate(row["routing"]) if row.get("routing") else None,
    )


def state_of(result: ChatResult | None) -> RequestState:
    """The client-facing status of a request with this result (None: not finished)."""
    if result is None:
        return "queued"
    if result.error is None:
        return "completed"
    if result.error.type == "cancelled":
        return "cancelled"
    if result.error.code == "deadline_exceeded":
        return "expired"
    return "failed"


def request_status(stored: StoredRequest) -> RequestStatus:
    """The `GET /v1/requests/{id}` answer for a stored request."""
    result = result_from_row(stored.result) if stored.result is not None else None
    status = RequestStatus(id="", status=state_of(result))
    if result is not None:
        status.id, status.created_at, status.completed_at = result.request_id, result.created_at, result.completed_at
        status.routing = Routing.of(result)
        status.attempts = result.attempts
        if result.error is None:
            status.result = ChatCompletionResponse.from_result(result)
        else:
            status.error = ErrorInfo(message=result.error.message, type=result.error.type, code=result.error.code)
    if stored.request is not None:  # absent only when PostgreSQL refused the request's row
        status.id, status.created_at = stored.request["request_id"], stored.request["created_at"]
        status.model, status.trace_id = stored.request["model"], stored.request["trace_id"]
    return status
