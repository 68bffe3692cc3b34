"""Tracing for every service: one tracer provider per process, its spans sent over the bus or to OTLP.

`telemetry.spans` picks where finished spans go:
- `bus`: a BatchSpanProcessor hands them to `BusSpanExporter`, which publishes OTLP-encoded batches
  (ExportTraceServiceRequest bytes) to `autoglm.spans`; the exporter service stores and forwards them.
- `otlp`: the same processor with the OTLP/HTTP exporter, straight to `telemetry.otlp_endpoint`.
- `off`: spans are made (so trace ids exist and travel in Kafka headers) but go nowhere.

Spans are per request. FastStream's consume span for a whole batch (router, workers) is not exported:
a batch of many requests belongs to no one trace, so it would only list a trace of its own beside
theirs; each request's share of the batch is a span in its own trace (`route request`, `run job`),
and anything the batch handler publishes outside those runs `in_trace` of its record.

Export never slows request handling: spans wait in the processor's bounded queue and leave from its
own thread; when the queue is full or a send fails, spans are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from shared import topics
from shared.settings import CommonSettings, TelemetryConfig

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0  # a publish that takes longer is counted as failed; the export thread moves on
# Where FastStream names the topic of a publish span, and of a consume span.
DESTINATION_ATTRIBUTES = ("messaging.destination.name", "messaging.destination_publish.name")
BATCH_COUNT_ATTRIBUTE = "messaging.batch.message_count"  # FastStream sets it on a batch's spans


class ExportStats:
    """Counts of what happened to the process's finished spans (read by /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exported = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "export_failed": 0}

    def add_exported(self, count: int) -> None:
        with self._lock:
            self.exported += count

    def add_dropped(self, reason: str, count: int) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


class BusSpanExporter(SpanExporter):
    """Publishes span batches to the spans topic as OTLP protobuf, from a private event loop and producer.

    The BatchSpanProcessor calls `export` from its own thread; the producer lives on a loop in a
    thread of ours, so neither the service's event loop nor its broker is ever involved.
    """

    def __init__(self, bootstrap: str, service: str, stats: ExportStats, topic: str = topics.SPANS) -> None:
        self.bootstrap = bootstrap
        self.service = service
        self.topic = topic
        self.stats = stats
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="span-bus-exporter", daemon=True)
        self._thread.start()
        self._producer: AIOKafkaProducer | None = None

    async def _send(self, payload: bytes) -> None:
        if self._producer is None:  # started on first use: a service must start even while Kafka is down
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=f"autoglm-{self.service}-spans",
                acks=1,  # telemetry: one copy is enough, and it keeps the export thread quick
                linger_ms=50,
                max_request_size=8 * 1024 * 1024,
            )
            await producer.start()
            self._producer = producer
        await self._producer.send_and_wait(self.topic, payload)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        payload = encode_spans(spans).SerializeToString()
        future = asyncio.run_coroutine_threadsafe(self._send(payload), self._loop)
        try:
            future.result(SEND_TIMEOUT_S)
        except Exception as error:  # including the timeout: the span batch is lost, the service is not
            future.cancel()
            self.stats.add_dropped("export_failed", len(spans))
            logger.warning(
                "could not publish %d spans to %s: %s: %s", len(spans), self.topic, type(error).__name__, error
            )
            return SpanExportResult.FAILURE
        self.stats.add_exported(len(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._producer.stop(), self._loop).result(SEND_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SEND_TIMEOUT_S)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export waits for its send


class CountingExporter(SpanExporter):
    """Counts what another exporter (OTLP/HTTP) did with the spans it was given."""

    def __init__(self, inner: SpanExporter, stats: ExportStats) -> None:
        self.inner = inner
        self.stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.stats.add_exported(len(spans))
        else:
            self.stats.add_dropped("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class ExportingProcessor(SpanProcessor):
    """A BatchSpanProcessor that leaves out the spans topic's own traffic and batch consume spans, and
    counts what it drops.

    Consuming `autoglm.spans` must make no span, or the spans of storing spans would be stored in
    turn, forever.
    """

    def __init__(self, exporter: SpanExporter, config: TelemetryConfig, stats: ExportStats) -> None:
        self.stats = stats
        self.max_queue_size = config.max_queue_size
        self.pending = 0  # spans handed to the batch processor and not yet exported (approximate)
        self._lock = threading.Lock()
        self.batch = BatchSpanProcessor(
            _Settled(exporter, self),
            max_queue_size=config.max_queue_size,
            max_export_batch_size=config.max_export_batch_size,
            schedule_delay_millis=config.schedule_delay_ms,
        )

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if is_spans_traffic(span) or is_batch_consume(span):
            return
        with self._lock:
            if self.pending >= self.max_queue_size:  # the batch processor would drop it silently
                self.stats.add_dropped("queue_full", 1)
                return
            self.pending += 1
        self.batch.on_end(span)

    def settled(self, count: int) -> None:
        with self._lock:
            self.pending = max(0, self.pending - count)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.batch.force_flush(timeout_millis)


class _Settled(SpanExporter):
    """Tells the processor how many queued spans left the queue, whatever became of them."""

    def __init__(self, inner: SpanExporter, processor: ExportingProcessor) -> None:
        self.inner = inner
        self.processor = processor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self.inner.export(spans)
        finally:
            self.processor.settled(len(spans))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def is_spans_traffic(span: ReadableSpan) -> bool:
    """True for a span about publishing to or consuming from the spans topic."""
    attributes = span.attributes or {}
    return any(attributes.get(key) == topics.SPANS for key in DESTINATION_ATTRIBUTES)


def is_batch_consume(span: ReadableSpan) -> bool:
    """True for FastStream's span of consuming a whole batch (it starts a trace of its own)."""
    return span.kind is trace.SpanKind.CONSUMER and BATCH_COUNT_ATTRIBUTE in (span.attributes or {})


class StatsCollector(Collector):
    """Prometheus view of the span export counts."""

    def __init__(self, stats: ExportStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[CounterMetricFamily]:
        exported = CounterMetricFamily("autoglm_spans_exported", "Finished spans sent on (to the bus or to OTLP)")
        exported.add_metric([], self.stats.exported)
        dropped = CounterMetricFamily("autoglm_spans_dropped", "Finished spans lost, by reason", labels=["reason"])
        for reason, count in sorted(self.stats.dropped.items()):
            dropped.add_metric([reason], count)
        return [exported, dropped]


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a base endpoint."""
    return endpoint.rstrip("/") + "/v1/traces"


def span_exporter(settings: CommonSettings, service: str, stats: ExportStats) -> SpanExporter | None:
    """The exporter `telemetry.spans` asks for (None: spans stay in the process)."""
    mode = settings.telemetry.spans
    if mode == "bus":
        return BusSpanExporter(settings.kafka_bootstrap, service, stats)
    if mode == "otlp":
        return CountingExporter(OTLPSpanExporter(endpoint=otlp_traces_url(settings.telemetry.otlp_endpoint)), stats)
    return None


_process_stats: dict[str, ExportStats] = {}
"""The process's span export counts (key "stats"): the tracer provider is process-wide, and so are they."""


def setup_tracing(service: str, settings: CommonSettings, registry: CollectorRegistry | None = None) -> None:
    """Give the process a tracer provider whose spans go where `telemetry.spans` says (once per process)."""
    if "stats" not in _process_stats or not isinstance(trace.get_tracer_provider(), TracerProvider):
        stats = ExportStats()
        provider = TracerProvider(resource=Resource({"service.name": service}))
        exporter = span_exporter(settings, service, stats)
        if exporter is not None:
            provider.add_span_processor(ExportingProcessor(exporter, settings.telemetry, stats))
        trace.set_tracer_provider(provider)
        _process_stats["stats"] = stats
        logger.debug("tracing %s: spans go to %s", service, settings.telemetry.spans)
    if registry is not None:
        registry.register(StatsCollector(_process_stats["stats"]))


def flush_spans(timeout_millis: int = 5_000) -> None:
    """Send what is queued now (at shutdown, so the last requests' spans are not lost)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis)


def record_context(record: ConsumerRecord) -> otel_context.Context:
    """The trace context a Kafka record carries in its W3C `traceparent` header."""
    headers = {key: value.decode("latin-1") for key, value in record.headers or ()}
    return propagate.extract(headers)


@contextlib.contextmanager
def in_trace(parent: otel_context.Context) -> Iterator[None]:
    """Make `parent` the current context, so the spans (and the trace headers of publishes) made inside
    belong to its trace."""
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


def timed_span(
    name: str,
    parent: otel_context.Context,
    start_ns: int,
    end_ns: int,
    *,
    attributes: dict[str, Any] | None = None,
    links: Sequence[Link] = (),
) -> trace.Span:
    """A finished span for work already done (e.g. one request's share of a batch) with its real timing."""
    span = trace.get_tracer("autoglm").start_span(
        name, context=parent, start_time=start_ns, attributes=attributes, links=links
    )
    span.end(end_time=max(start_ns, end_ns))
    return span
