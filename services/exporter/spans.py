"""The exporter's span subscriber: OTLP span batches from the bus, stored in PostgreSQL, then forwarded.

Order of work per batch of records: store every span (idempotent on trace and span id), commit,
forward the records' bytes unchanged to the OTLP endpoint (Jaeger), and only then commit the
offsets. Forwarding is tried a few times and then given up on, logged and counted: the spans are
safe in PostgreSQL, and the pipeline must not wait on Jaeger forever.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from aiokafka import ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterSettings
from services.exporter.store import without_nul
from shared import topics
from shared.db.tables import SpanRow
from shared.kafka import FETCH_MAX_WAIT_MS, publish_dead_letter
from shared.telemetry import otlp_traces_url

logger = logging.getLogger(__name__)

GROUP_ID = f"autoglm-exporter-{topics.SPANS}"
ROWS_PER_STATEMENT = 1_000  # 15 columns each: well under PostgreSQL's 32,767 bind parameters
KINDS = {value: name.removeprefix("SPAN_KIND_").lower() for name, value in Span.SpanKind.items()}
STATUS_CODES = {value: name.removeprefix("STATUS_CODE_").lower() for name, value in Status.StatusCode.items()}


def any_value(value: AnyValue) -> Any:
    """An OTLP attribute value as JSON (bytes in base64, as OTLP's own JSON encoding and Jaeger give them)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    """OTLP key-value pairs as a JSON object."""
    return {pair.key: any_value(pair.value) for pair in pairs}


def from_unix_nano(nanos: int) -> datetime:
    return datetime.fromtimestamp(nanos / 1e9, UTC)


def event_json(event: Span.Event) -> dict[str, Any]:
    return {
        "name": event.name,
        "time": from_unix_nano(event.time_unix_nano).isoformat(),
        "attributes": attributes_of(event.attributes),
    }


def span_row(span: Span, service: str) -> dict[str, Any]:
    """The `spans` row of one OTLP span."""
    return without_nul(
        {
            "trace_id": span.trace_id.hex(),
            "span_id": span.span_id.hex(),
            "parent_span_id": span.parent_span_id.hex() or None,
            "service": service,
            "name": span.name,
            "kind": KINDS.get(span.kind, "unspecified"),
            "start_time": from_unix_nano(span.start_time_unix_nano),
            "end_time": from_unix_nano(span.end_time_unix_nano),
            "duration_ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
            "status_code": STATUS_CODES.get(span.status.code, "unset"),
            "status_message": span.status.message or None,
            "attributes": attributes_of(span.attributes),
            "events": [event_json(event) for event in span.events],
            "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()} for link in span.links],
        }
    )


def service_of(resource_attributes: list[KeyValue]) -> str:
    for pair in resource_attributes:
        if pair.key == "service.name":
            return str(any_value(pair.value))
    return "unknown"


def span_rows(batch: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Every span of one export request as `spans` rows."""
    return [
        span_row(span, service_of(list(resource_spans.resource.attributes)))
        for resource_spans in batch.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


async def store_spans(engine: AsyncEngine, rows: list[dict[str, Any]]) -> int:
    """Insert spans in one transaction, skipping those already stored; returns rows inserted."""
    inserted = 0
    async with engine.begin() as connection:
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            statement = insert(SpanRow).values(chunk).on_conflict_do_nothing(index_elements=["trace_id", "span_id"])
            inserted += (await connection.execute(statement)).rowcount
    return inserted


class SpanForwarder:
    """Sends stored span batches on to an OTLP/HTTP endpoint, trying a few times, never for long."""

    def __init__(self, endpoint: str, attempts: int, registry: CollectorRegistry, backoff_s: float = 0.2) -> None:
        self.url = otlp_traces_url(endpoint)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self.forwarded = Counter("autoglm_spans_forwarded", "Span batches forwarded to OTLP", registry=registry)
        self.failed = Counter(
            "autoglm_spans_forward_failures", "Span batches given up on after every attempt", registry=registry
        )

    async def forward(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            if await self.send(payload):
                self.forwarded.inc()
            else:
                self.failed.inc()

    async def send(self, payload: bytes) -> bool:
        """True once the endpoint took the batch; False after `attempts` failures (logged)."""
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self.client.post(
                    self.url, content=payload, headers={"content-type": "application/x-protobuf"}
                )
                if response.status_code < 300:
                    return True
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        logger.warning("gave up forwarding a span batch to %s after %d attempts: %s", self.url, self.attempts, problem)
        return False

    async def close(self) -> None:
        await self.client.aclose()


def parse_batches(
    records: tuple[ConsumerRecord, ...],
) -> tuple[list[tuple[bytes, ExportTraceServiceRequest]], list[tuple[ConsumerRecord, DecodeError]]]:
    """The records that hold OTLP export requests, and those that do not (with why)."""
    good, bad = [], []
    for record in records:
        try:
            good.append((record.value, ExportTraceServiceRequest.FromString(record.value)))
        except DecodeError as error:
            bad.append((record, error))
    return good, bad


def register_span_handlers(
    broker: KafkaBroker, settings: ExporterSettings, engine: AsyncEngine, registry: CollectorRegistry
) -> SpanForwarder | None:
    """Subscribe the exporter to the spans topic; returns the forwarder to close at shutdown (None: not forwarding)."""
    telemetry = settings.telemetry
    forwarder = (
        SpanForwarder(telemetry.otlp_endpoint, telemetry.forward_attempts, registry)
        if telemetry.forward_spans
        else None
    )
    stored = Counter("autoglm_spans_stored", "Spans newly stored in PostgreSQL", registry=registry)
    backoff_s = settings.retries.backoff.initial_ms / 1000.0

    @broker.subscriber(
        topics.SPANS,
        group_id=GROUP_ID,
        batch=True,
        max_records=settings.exporter.max_batch_size,
        batch_timeout_ms=settings.exporter.max_wait_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,  # committed only after the database commit (and the forwarding try)
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title="persist and forward spans",
    )
    async def persist_spans(message: KafkaMessage) -> None:
        """Store the spans of every service, then hand them to Jaeger."""
        good, bad = parse_batches(message.raw_message)
        try:
            inserted = await store_spans(engine, [row for _, batch in good for row in span_rows(batch)])
        except Exception:
            logger.exception("storing spans failed; retrying the batch in %.1f s", backoff_s)
            await asyncio.sleep(backoff_s)
            await message.nack()
            return
        stored.inc(inserted)
        for record, error in bad:
            await publish_dead_letter(
                broker, service="exporter", source_topic=record.topic, body=record.value, error=error
            )
        if forwarder is not None:
            await forwarder.forward([payload for payload, _ in good])
        await message.ack()
        logger.debug("stored %d new spans from %d batches", inserted, len(good))

    return forwarder
