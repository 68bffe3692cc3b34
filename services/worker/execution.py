"""Turning a batch of routed jobs into results: skip what nobody waits for, run the rest."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime

from services.worker.backends.base import (
    Backend,
    BatchTooLargeError,
    DeltaSink,
    GenerationInput,
    GenerationOutput,
    PermanentBackendError,
)
from services.worker.streaming import wants_stream
from shared.messages import ChatMessage, ChatResult, Choice, ErrorInfo, RoutedJob, Timings, Usage, utcnow
from shared.settings import ModelConfig

logger = logging.getLogger(__name__)


class LoadedModel:
    """A backend together with the configuration of the model it serves."""

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend


def elapsed_ms(since: datetime, until: datetime) -> float:
    """Milliseconds between two instants."""
    return (until - since).total_seconds() * 1000.0


def generation_input(job: RoutedJob, config: ModelConfig, cancelled: Container[str] = ()) -> GenerationInput:
    """What the model needs from a job; max_tokens defaults to the model's configured value."""
    request = job.request
    return GenerationInput(
        request_id=job.request_id,
        messages=request.messages,
        max_tokens=request.max_tokens or config.default_max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=list(request.stop or []),
        seed=request.seed,
        stream=wants_stream(job),
        prompt_format=request.prompt_format,
        is_cancelled=lambda: job.request_id in cancelled,
    )


def base_result(job: RoutedJob, taken_at: datetime) -> ChatResult:
    """A result carrying the job's identity and routing, to be filled in."""
    return ChatResult(
        request_id=job.request_id,
        model=job.model,
        pool=job.pool,
        score=job.score,
        reasons=job.reasons,
        routing=job.routing,
        created_at=job.request.created_at,
        probe=job.request.probe,
        timings=Timings(queue_ms=elapsed_ms(job.request.created_at, taken_at)),
    )


def answered_result(
    job: RoutedJob, output: GenerationOutput, taken_at: datetime, inference_ms: float, batch_size: int
) -> ChatResult:
    """The result for a job the model ran (successfully or with a per-request error)."""
    result = base_result(job, taken_at)
    result.usage = Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )
    result.timings.inference_ms = inference_ms
    result.timings.batch_size = batch_size
    if output.error is not None:
        result.error = ErrorInfo(type="invalid_request_error", code=output.error_code, message=output.error)
    else:
        message = ChatMessage(role="assistant", content=output.text)
        result.choices = [Choice(message=message, finish_reason=output.finish_reason)]
    result.completed_at = utcnow()
    result.timings.total_ms = elapsed_ms(job.request.created_at, result.completed_at)
    return result


def skipped_result(job: RoutedJob, taken_at: datetime, cancelled: Container[str] = ()) -> ChatResult | None:
    """The result of a job that must not run (a probe, cancelled, or past its deadline), else None."""
    if job.request.probe:
        result = base_result(job, taken_at)
        result.choices = [Choice(message=ChatMessage(role="assistant", content=""))]
        return result
    if job.request_id in cancelled:
        return cancelled_result(job, taken_at)
    if job.request.is_expired(taken_at):
        result = base_result(job, taken_at)
        result.error = ErrorInfo(
            type="timeout", code="deadline_exceeded", message="the request's deadline passed before it ran"
        )
        return result
    return None


def unknown_model_result(job: RoutedJob, taken_at: datetime, served: list[str]) -> ChatResult:
    """A job routed to a pool that does not serve its model (a stale router config)."""
    result = base_result(job, taken_at)
    message = f"pool {job.pool!r} does not serve model {job.model!r}; it serves {served}"
    result.error = ErrorInfo(type="invalid_request_error", code="model_not_found", message=message)
    return result


@dataclass(frozen=True)
class JobFailure:
    """A job its backend failed on for a reason that may pass: to be retried later."""

    job: RoutedJob
    error: Exception


Outcome = ChatResult | JobFailure


def cancelled_result(job: RoutedJob, taken_at: datetime) -> ChatResult:
    """The answer for a job cancelled before it ran."""
    result = base_result(job, taken_at)
    result.error = ErrorInfo(type="cancelled", code="request_cancelled", message="the request was cancelled")
    return result


async def run_batch(
    jobs: list[RoutedJob],
    models: dict[str, LoadedModel],
    cancelled: Container[str] = (),
    on_delta: DeltaSink | None = None,
) -> list[Outcome]:
    """One outcome per job, in order: a result (answer or error) or a failure to retry.

    Streamed jobs hand their text to `on_delta` as it is generated.
    """
    taken_at = utcnow()
    outcomes: dict[str, Outcome] = {}
    by_model: dict[str, list[RoutedJob]] = defaultdict(list)
    for job in jobs:
        skipped = skipped_result(job, taken_at, cancelled)
        if skipped is not None:
            outcomes[job.request_id] = skipped
        elif job.model not in models:
            outcomes[job.request_id] = unknown_model_result(job, taken_at, sorted(models))
        else:
            by_model[job.model].append(job)
    for model_id, group in by_model.items():
        for job, outcome in zip(
            group, await run_on_model(group, models[model_id], taken_at, on_delta, cancelled), strict=True
        ):
            outcomes[job.request_id] = outcome
    return [outcomes[job.request_id] for job in jobs]


async def run_on_model(
    jobs: list[RoutedJob],
    model: LoadedModel,
    taken_at: datetime,
    on_delta: DeltaSink | None = None,
    cancelled: Container[str] = (),
) -> list[Outcome]:
    """Run one model's share of the batch; halve it while it does not fit in memory.

    A job cancelled while it ran is answered `cancelled`, whatever it produced.
    """
    inputs = [generation_input(job, model.config, cancelled) for job in jobs]
    started = time.perf_counter()
    try:
        outputs = await model.backend.agenerate(inputs, on_delta)
    except BatchTooLargeError as error:
        if len(jobs) == 1:
            return [JobFailure(jobs[0], error)]
        half = len(jobs) // 2
        logger.warning("batch of %d did not fit on %s; running it in halves", len(jobs), model.config.id)
        first, second = jobs[:half], jobs[half:]
        return [
            *await run_on_model(first, model, taken_at, on_delta, cancelled),
            *await run_on_model(second, model, taken_at, on_delta, cancelled),
        ]
    except PermanentBackendError as error:
        return [backend_refused_result(job, taken_at, error) for job in jobs]
    except Exception as error:
        logger.warning("%s failed on a batch of %d: %s: %s", model.config.id, len(jobs), type(error).__name__, error)
        return [JobFailure(job, error) for job in jobs]
    inference_ms = (time.perf_counter() - started) * 1000.0
    logger.info("ran a batch of %d on %s in %.1f ms", len(jobs), model.config.id, inference_ms)
    return [
        cancelled_result(job, taken_at)
        if job.request_id in cancelled
        else answered_result(job, output, taken_at, inference_ms, len(jobs))
        for job, output in zip(jobs, outputs, strict=True)
    ]


def backend_refused_result(job: RoutedJob, taken_at: datetime, error: PermanentBackendError) -> ChatResult:
    """The engine refused the request itself: answer at once, never retry."""
    result = base_result(job, taken_at)
    result.error = ErrorInfo(type="invalid_request_error", code="rejected_by_backend", message=str(error))
    return result


def exhausted_result(job: RoutedJob, attempts: int, error: Exception) -> ChatResult:
    """The answer for a job that failed on every attempt (it is also dead-lettered)."""
    result = base_result(job, utcnow())
    message = f"inference failed after {attempts} attempts: {type(error).__name__}: {error}"
    result.error = ErrorInfo(type="server_error", code="retries_exhausted", message=message[:2000])
    result.attempts = attempts
    return result
