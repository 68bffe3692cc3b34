"""Worker subscriber on FastStream's in-memory broker, running the real tiny model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker, TestKafkaBroker
from prometheus_client import CollectorRegistry

from services.worker.app import load_models
from services.worker.backends.base import (
    Backend,
    BackendInfo,
    BatchTooLargeError,
    DeltaSink,
    GenerationInput,
    GenerationOutput,
    TransientBackendError,
)
from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel
from services.worker.handlers import register_handlers, split_lanes
from services.worker.metrics import WorkerMetrics
from shared import topics
from shared.kafka import make_broker
from shared.messages import (
    CancelRequest,
    ChatMessage,
    ChatRequest,
    ChatResult,
    DeadLetter,
    ReplyRoute,
    RoutedJob,
    utcnow,
)


@pytest.fixture(scope="module")
def settings(tiny_models_dir: Path) -> WorkerSettings:
    return WorkerSettings(models_dir=tiny_models_dir, worker={"pool": "light"})


@pytest.fixture(scope="module")
def models(settings: WorkerSettings) -> dict[str, LoadedModel]:
    return load_models(settings)


@pytest.fixture
def broker(settings: WorkerSettings, models: dict[str, LoadedModel]) -> KafkaBroker:
    broker = make_broker(settings, service="worker", registry=CollectorRegistry())
    register_handlers(broker, settings, models, WorkerMetrics.create(CollectorRegistry(), "light"))
    return broker


REASONS = ["score 0.10 < threshold 0.5"]


def job(content: str = "hi", **request_fields: object) -> RoutedJob:
    request = ChatRequest(
        messages=[ChatMessage(role="user", content=content)],
        reply_to=ReplyRoute(topic=topics.REPLIES, partition=3),
        **request_fields,  # type: ignore[arg-type]
    )
    return RoutedJob(
        request_id=request.request_id, request=request, pool="light", model="tiny-light", score=0.1, reasons=REASONS
    )


def results_of(mock: MagicMock) -> dict[str, ChatResult]:
    return {r.request_id: r for r in (ChatResult.model_validate(call.args[0]) for call in mock.call_args_list)}


async def test_a_job_is_answered_on_results_and_on_its_reply_route(broker: KafkaBroker) -> None:
    async with TestKafkaBroker(broker) as br:
        results = br.subscriber(topics.RESULTS)(lambda m: None)  # type: ignore[arg-type]
        replies = br.subscriber(topics.REPLIES)(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        sent = job(max_tokens=3, temperature=0)
        await br.publish_batch(sent, topic=topics.jobs_topic("light"))
        result = results_of(results.mock)[sent.request_id]
        assert results_of(replies.mock)[sent.request_id] == result
    assert result.ok and result.model == "tiny-light" and result.pool == "light"
    assert result.attempts == 1 and result.reasons == REASONS
    assert 0 < result.usage.completion_tokens <= 3
    assert result.timings.inference_ms > 0 and result.timings.batch_size == 1


async def test_expired_probe_and_invalid_jobs_never_reach_the_model(broker: KafkaBroker) -> None:
    async with TestKafkaBroker(broker) as br:
        results = br.subscriber(topics.RESULTS)(lambda m: None)  # type: ignore[arg-type]
        letters = br.subscriber(topics.DEADLETTER)(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        expired = job(deadline=utcnow() - timedelta(seconds=1))
        probe = job(probe=True)
        good = job("hello", max_tokens=2)
        await br.publish_batch(expired, probe, b"not a job", good, topic=topics.jobs_topic("light"))
        by_id = results_of(results.mock)
        letter = DeadLetter.model_validate(letters.mock.call_args.args[0])
    assert by_id[expired.request_id].error is not None and by_id[expired.request_id].error.type == "timeout"  # type: ignore[union-attr]
    assert by_id[probe.request_id].ok and by_id[probe.request_id].usage.total_tokens == 0
    assert by_id[good.request_id].ok and by_id[good.request_id].timings.batch_size == 1
    assert letter.payload == "not a job" and letter.service == "worker"


class FlakyBackend:
    """The real tiny model behind a fault injector: fails the first `failures` calls, or big batches."""

    def __init__(self, inner: Backend, *, failures: int = 0, max_fit: int | None = None) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.failures = failures
        self.max_fit = max_fit
        self.batch_sizes: list[int] = []

    async def agenerate(
        self, batch: list[GenerationInput], on_delta: DeltaSink | None = None
    ) -> list[GenerationOutput]:
        self.batch_sizes.append(len(batch))
        if self.max_fit is not None and len(batch) > self.max_fit:
            raise BatchTooLargeError(f"{len(batch)} > {self.max_fit}")
        if self.failures > 0:
            self.failures -= 1
            raise TransientBackendError("the engine is restarting")
        return await self.inner.agenerate(batch)

    def info(self) -> BackendInfo:
        return self.inner.info()

    def close(self) -> None:
        """The inner backend belongs to the module fixture."""


def flaky_broker(settings: WorkerSettings, models: dict[str, LoadedModel], backend: FlakyBackend) -> KafkaBroker:
    flaky_models = {"tiny-light": LoadedModel(models["tiny-light"].config, backend)}
    broker = make_broker(settings, service="worker", registry=CollectorRegistry())
    register_handlers(broker, settings, flaky_models, WorkerMetrics.create(CollectorRegistry(), "light"))
    return broker


async def test_a_transient_failure_is_retried_then_answered(
    settings: WorkerSettings, models: dict[str, LoadedModel]
) -> None:
    backend = FlakyBackend(models["tiny-light"].backend, failures=1)
    async with TestKafkaBroker(flaky_broker(settings, models, backend)) as br:
        results = br.subscriber(topics.RESULTS)(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        sent = job(max_tokens=2)
        await br.publish_batch(sent, topic=topics.jobs_topic("light"))
        result = results_of(results.mock)[sent.request_id]
    assert result.ok and backend.batch_sizes == [1, 1]
    assert result.attempts == 2 and result.reasons == REASONS


async def test_exhausted_retries_dead_letter_the_job_and_answer_the_caller(
    settings: WorkerSettings, models: dict[str, LoadedModel]
) -> None:
    backend = FlakyBackend(models["tiny-light"].backend, failures=settings.retries.max_attempts)
    async with TestKafkaBroker(flaky_broker(settings, models, backend)) as br:
        results = br.subscriber(topics.RESULTS)(lambda m: None)  # type: ignore[arg-type]
        letters = br.subscriber(topics.DEADLETTER)(lambda m: None)  # type: ignore[arg-type]
        retries = br.subscriber(topics.retry_topic("light"))(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        sent = job(max_tokens=2)
        await br.publish_batch(sent, topic=topics.jobs_topic("light"))
        result = results_of(results.mock)[sent.request_id]
        letter = DeadLetter.model_validate(letters.mock.call_args.args[0])
        retried = retries.mock.call_count
    assert retried == settings.retries.max_attempts - 1
    assert len(backend.batch_sizes) == settings.retries.max_attempts
    assert result.error is not None and result.error.code == "retries_exhausted"
    assert result.attempts == settings.retries.max_attempts and result.reasons == REASONS
    assert letter.request_id == sent.request_id and letter.attempts == settings.retries.max_attempts
    assert letter.error_type == "TransientBackendError" and "restarting" in letter.reason


async def test_a_batch_too_big_for_memory_is_split(settings: WorkerSettings, models: dict[str, LoadedModel]) -> None:
    backend = FlakyBackend(models["tiny-light"].backend, max_fit=2)
    async with TestKafkaBroker(flaky_broker(settings, models, backend)) as br:
        results = br.subscriber(topics.RESULTS)(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        sent = [job(f"prompt {i}", max_tokens=2) for i in range(5)]
        await br.publish_batch(*sent, topic=topics.jobs_topic("light"))
        by_id = results_of(results.mock)
    assert all(by_id[j.request_id].ok for j in sent)
    assert backend.batch_sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, the 3 -> 1 + 2


async def test_a_cancelled_job_is_answered_without_running(broker: KafkaBroker) -> None:
    async with TestKafkaBroker(broker) as br:
        results = br.subscriber(topics.RESULTS)(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        doomed, kept = job("never mind", max_tokens=2), job("go on", max_tokens=2)
        await br.publish(CancelRequest(request_id=doomed.request_id), topics.CONTROL)
        await br.publish_batch(doomed, kept, topic=topics.jobs_topic("light"))
        by_id = results_of(results.mock)
    assert by_id[doomed.request_id].error is not None and by_id[doomed.request_id].error.type == "cancelled"  # type: ignore[union-attr]
    assert by_id[doomed.request_id].usage.total_tokens == 0
    assert by_id[kept.request_id].ok


def test_priority_jobs_of_a_batch_run_as_a_lane_of_their_own_before_the_normal_ones() -> None:
    def record(topic: str, offset: int) -> ConsumerRecord:
        return ConsumerRecord(topic, 0, offset, 0, 0, None, b"{}", None, 0, 2, [])

    normal, urgent = record(topics.jobs_topic("light"), 1), record(topics.priority_topic("light"), 7)
    assert split_lanes((normal, urgent)) == [(urgent,), (normal,)]
    assert split_lanes((normal,)) == [(normal,)]
