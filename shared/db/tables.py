"""PostgreSQL tables: the exporter writes them, the gateway reads them; Alembic migrations create them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Float, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the exporter's tables."""


class RequestRow(Base):
    """One chat request as it entered the bus."""

    __tablename__ = "requests"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(200))
    caller: Mapped[str | None] = mapped_column(String(200))
    end_user: Mapped[str | None] = mapped_column(String(200))
    priority: Mapped[int] = mapped_column(Integer)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    trace_id: Mapped[str | None] = mapped_column(String(32), comment="W3C trace id from the record's traceparent")
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ResultRow(Base):
    """The outcome of a request: the answer or the error, with usage, timings and routing."""

    __tablename__ = "results"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str | None] = mapped_column(String(200), index=True)
    pool: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[float | None] = mapped_column(Float)
    content: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    queue_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="1")
    reasons: Mapped[list[str]] = mapped_column(JSONB, server_default="[]")
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSONB, comment="RoutingExplanation (None: not routed)")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FeedbackRow(Base):
    """A client's score of a completion (not tied to `requests` by a key: it may arrive first)."""

    __tablename__ = "feedback"

    feedback_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    score: Mapped[float] = mapped_column(Float)
    comment: Mapped[str | None] = mapped_column(Text)
    caller: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKeyRow(Base):
    """A gateway API key: only the SHA-256 digest of the secret is stored, with a prefix to recognise it by."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)


class SpanRow(Base):
    """One finished OpenTelemetry span of any service, as it came off the spans topic."""

    __tablename__ = "spans"

    trace_id: Mapped[str] = mapped_column(String(32), primary_key=True, comment="W3C trace id, 32 hex digits")
    span_id: Mapped[str] = mapped_column(String(16), primary_key=True, comment="16 hex digits")
    parent_span_id: Mapped[str | None] = mapped_column(String(16), comment="None: the root of its trace")
    service: Mapped[str] = mapped_column(String(200), index=True, comment="Resource attribute service.name")
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), comment="internal, server, client, producer or consumer")
    start_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    end_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[str] = mapped_column(String(8), comment="unset, ok or error")
    status_message: Mapped[str | None] = mapped_column(Text)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB)
    events: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default="[]")
    links: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default="[]", comment="[{trace_id, span_id}]")


class RoutingDecisionRow(Base):
    """The router's decision for a request, read from the jobs topics: stored even if no result ever comes."""

    __tablename__ = "routing_decisions"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True, comment="The first decision is kept")
    pool: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    lane: Mapped[str] = mapped_column(String(16), comment="normal or priority: the jobs topic it went to")
    score: Mapped[float] = mapped_column(Float)
    policy: Mapped[str | None] = mapped_column(String(32))
    reasons: Mapped[list[str]] = mapped_column(JSONB)
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSONB, comment="RoutingExplanation")
    routed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RetryRow(Base):
    """One further attempt a worker scheduled for a request (a record on `autoglm.retry.<pool>`)."""

    __tablename__ = "retries"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    attempt: Mapped[int] = mapped_column(
        Integer, primary_key=True, comment="The attempt scheduled: 2 is the first retry"
    )
    pool: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text, comment="Why the previous attempt failed, when the worker says")
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeadLetterRow(Base):
    """A message no service could process. A dead letter has no id of its own: its Kafka position is its key."""

    __tablename__ = "dead_letters"

    kafka_partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    kafka_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    source_topic: Mapped[str] = mapped_column(String(255))
    service: Mapped[str] = mapped_column(String(100))
    error_type: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text)
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class CancellationRow(Base):
    """A request's cancellation (the first one: cancelling it again changes nothing)."""

    __tablename__ = "cancellations"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
