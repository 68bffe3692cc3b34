"""Per-request spans of a batch: where each request's time went in the worker.

A batch mixes requests of many traces, so every job gets spans of its own in its own trace, with the
batch's real timing: `run job` (from the router's publish to the settled outcome), and under it
`queue wait` (published until the batch was taken), `inference` (the model call that included it,
with the batch size) and the result's publish.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.worker.execution import JobFailure, Outcome
from shared.logging import bound_request_id
from shared.messages import ChatResult, RoutedJob
from shared.telemetry import record_context, timed_span

TRACER = trace.get_tracer(__name__)
NS_PER_MS = 1_000_000


def published_ns(record: ConsumerRecord, fallback_ns: int) -> int:
    """When the job was published (the record's timestamp), in ns; `fallback_ns` if it has none."""
    timestamp = getattr(record, "timestamp", None)
    return timestamp * NS_PER_MS if isinstance(timestamp, int) and timestamp > 0 else fallback_ns


@contextmanager
def job_span(record: ConsumerRecord, job: RoutedJob, attempt: int, taken_ns: int) -> Iterator[trace.Span]:
    """`run job`, continuing the record's trace and current inside the block (logs carry its ids)."""
    attributes = {
        "autoglm.request_id": job.request_id, "autoglm.pool": job.pool, "autoglm.model": job.model,
        "autoglm.attempt": attempt, "messaging.destination.name": record.topic,
    }  # fmt: skip
    start_ns = min(published_ns(record, taken_ns), taken_ns)
    with (
        bound_request_id(job.request_id),
        TRACER.start_as_current_span(
            "run job", context=record_context(record), kind=SpanKind.CONSUMER, start_time=start_ns,
            attributes=attributes,
        ) as span,
    ):  # fmt: skip
        timed_span("queue wait", trace.set_span_in_context(span), start_ns, taken_ns)
        yield span


def record_outcome(span: trace.Span, outcome: Outcome) -> str:
    """The outcome on `run job`, and the `inference` span of the model call that produced it; returns the outcome."""
    if isinstance(outcome, JobFailure):
        span.set_status(Status(StatusCode.ERROR, f"{type(outcome.error).__name__}: {outcome.error}"[:500]))
        span.set_attribute("autoglm.outcome", "failed")
        return "failed"
    label = (outcome.error.code or outcome.error.type) if outcome.error else "ok"
    span.set_attribute("autoglm.outcome", label)
    if outcome.error is not None and outcome.error.type == "server_error":
        span.set_status(Status(StatusCode.ERROR, outcome.error.message[:500]))
    inference_span(span, outcome)
    return label


def inference_span(parent: trace.Span, result: ChatResult) -> None:
    """The model call as this request saw it: the batch's duration and size, the request's tokens."""
    if result.timings.inference_ms <= 0:
        return  # not run: skipped, cancelled early, or refused
    end_ns = int(result.completed_at.timestamp() * 1e9)
    attributes = {
        "autoglm.batch_size": result.timings.batch_size,
        "autoglm.model": result.model,
        "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": result.usage.completion_tokens,
    }
    start_ns = end_ns - int(result.timings.inference_ms * NS_PER_MS)
    timed_span("inference", trace.set_span_in_context(parent), start_ns, end_ns, attributes=attributes)
