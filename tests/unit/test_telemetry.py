"""Span plumbing that needs no broker: encoding to rows, the export processor, forwarding, log context."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from aiokafka import ConsumerRecord
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind
from prometheus_client import CollectorRegistry

from services.exporter.spans import SpanForwarder, span_rows
from services.router.config import RouterSettings
from services.worker.tracing import job_span
from shared import topics
from shared.logging import ContextFilter, JsonFormatter
from shared.messages import ChatMessage, ChatRequest, RoutedJob
from shared.settings import TelemetryConfig
from shared.supervisor import traces_lines
from shared.telemetry import ExportingProcessor, ExportStats, StatsCollector, otlp_traces_url


def finished_spans() -> list[ReadableSpan]:
    """A parent and a child with attributes, an event and a link, as a service would make them."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "router"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("route request", kind=SpanKind.CONSUMER) as parent:
        link = Link(parent.get_span_context())
        with tracer.start_as_current_span(
            "score", attributes={"autoglm.score": 0.25, "tags": ["a", "b"]}, links=[link]
        ) as child:
            child.add_event("scored", {"n": 3})
    return list(memory.get_finished_spans())


def test_an_otlp_batch_becomes_one_row_per_span_with_its_parent_and_service() -> None:
    spans = finished_spans()
    wire = encode_spans(spans).SerializeToString()  # what travels on the spans topic
    rows = {row["name"]: row for row in span_rows(ExportTraceServiceRequest.FromString(wire))}
    parent, child = rows["route request"], rows["score"]
    assert parent["parent_span_id"] is None and parent["kind"] == "consumer" and parent["service"] == "router"
    assert child["parent_span_id"] == parent["span_id"] and child["trace_id"] == parent["trace_id"]
    assert len(child["trace_id"]) == 32 and len(child["span_id"]) == 16
    assert child["attributes"] == {"autoglm.score": 0.25, "tags": ["a", "b"]}
    assert child["events"][0]["name"] == "scored" and child["events"][0]["attributes"] == {"n": 3}
    assert child["links"] == [{"trace_id": parent["trace_id"], "span_id": parent["span_id"]}]
    assert child["start_time"].tzinfo is UTC and child["duration_ms"] >= 0
    assert child["status_code"] == "unset"


class Recording(SpanExporter):
    """Keeps what it is given; blocks while `gate` is closed."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.gate = threading.Event()
        self.gate.set()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.gate.wait(10)
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.gate.set()


def provider_with(processor: ExportingProcessor) -> TracerProvider:
    provider = TracerProvider(resource=Resource({"service.name": "test"}))
    provider.add_span_processor(processor)
    return provider


def test_the_spans_topics_own_traffic_is_never_exported() -> None:
    recording, stats = Recording(), ExportStats()
    processor = ExportingProcessor(recording, TelemetryConfig(schedule_delay_ms=10), stats)
    tracer = provider_with(processor).get_tracer("test")
    tracer.start_span("autoglm.spans process", attributes={"messaging.destination_publish.name": topics.SPANS}).end()
    tracer.start_span("autoglm.spans publish", attributes={"messaging.destination.name": topics.SPANS}).end()
    tracer.start_span("autoglm.results process", attributes={"messaging.destination.name": topics.RESULTS}).end()
    processor.force_flush()
    assert [span.name for span in recording.spans] == ["autoglm.results process"]
    processor.shutdown()


def test_a_batch_consume_span_is_not_exported_but_a_batch_publish_and_a_single_consume_are() -> None:
    recording, stats = Recording(), ExportStats()
    processor = ExportingProcessor(recording, TelemetryConfig(schedule_delay_ms=10), stats)
    tracer = provider_with(processor).get_tracer("test")
    batch = {"messaging.batch.message_count": 3, "messaging.destination_publish.name": topics.REQUESTS}
    tracer.start_span("autoglm.requests create", kind=SpanKind.CONSUMER, attributes=batch).end()
    tracer.start_span("autoglm.requests process", kind=SpanKind.CONSUMER, attributes=batch).end()
    tracer.start_span("autoglm.results publish", kind=SpanKind.PRODUCER, attributes=batch).end()
    tracer.start_span("autoglm.results process", kind=SpanKind.CONSUMER, attributes={"x": 1}).end()
    processor.force_flush()
    assert [span.name for span in recording.spans] == ["autoglm.results publish", "autoglm.results process"]
    assert stats.dropped == {"queue_full": 0, "export_failed": 0}  # left out on purpose, not lost
    processor.shutdown()


def test_a_full_queue_drops_spans_and_counts_them_without_blocking() -> None:
    recording, stats = Recording(), ExportStats()
    config = TelemetryConfig(max_queue_size=16, max_export_batch_size=16, schedule_delay_ms=10)
    processor = ExportingProcessor(recording, config, stats)
    tracer = provider_with(processor).get_tracer("test")
    recording.gate.clear()  # the export thread is stuck: nothing leaves the queue
    for index in range(20):
        tracer.start_span(f"span {index}").end()
    assert stats.dropped["queue_full"] == 4
    recording.gate.set()
    processor.force_flush()
    assert len(recording.spans) == 16
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    assert registry.get_sample_value("autoglm_spans_dropped_total", {"reason": "queue_full"}) == 4
    processor.shutdown()


async def test_forwarding_to_an_endpoint_that_is_down_gives_up_and_counts() -> None:
    registry = CollectorRegistry()
    forwarder = SpanForwarder("http://127.0.0.1:9", attempts=2, registry=registry, backoff_s=0.01)
    try:
        await forwarder.forward([encode_spans(finished_spans()).SerializeToString()])
    finally:
        await forwarder.close()
    assert registry.get_sample_value("autoglm_spans_forward_failures_total") == 1
    assert registry.get_sample_value("autoglm_spans_forwarded_total") == 0


def test_the_traces_url_of_an_otlp_endpoint() -> None:
    assert otlp_traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"


def test_telemetry_settings_refuse_an_endpoint_without_a_scheme() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TelemetryConfig(otlp_endpoint="127.0.0.1:4318")


def test_a_worker_log_line_inside_a_job_carries_its_trace_and_request_id() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())]
    record = ConsumerRecord(
        topic="autoglm.jobs.light", partition=0, offset=0, timestamp=1_700_000_000_000, timestamp_type=0,
        key=None, value=b"", checksum=None, serialized_key_size=0, serialized_value_size=0, headers=headers,
    )  # fmt: skip
    request = ChatRequest(messages=[ChatMessage(role="user", content="hi")])
    job = RoutedJob(request_id=request.request_id, request=request, pool="light", model="tiny-light", score=0.1)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter("worker"))
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.worker.lines")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with job_span(record, job, attempt=1, taken_ns=int(datetime.now(UTC).timestamp() * 1e9)):
            log.info("job settled: ok")
    finally:
        log.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["trace_id"] == trace_id and line["request_id"] == job.request_id and line["service"] == "worker"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "bus",
            "Traces       http://127.0.0.1:16686"
            "  (Jaeger: a request's trace at /trace/<its X-Trace-Id>, stored in PostgreSQL table spans)",
        ),
        ("otlp", "Traces       http://127.0.0.1:16686  (Jaeger: a request's trace at /trace/<its X-Trace-Id>)"),
        ("off", "Traces       off (telemetry.spans)"),
    ],
)
def test_make_run_says_where_the_traces_are(mode: str, expected: str) -> None:
    settings = RouterSettings(telemetry=TelemetryConfig(spans=mode))  # type: ignore[arg-type]
    assert traces_lines(settings) == [f"  {expected}"]
