"""Worker subscriber on FastStream's in-memory broker, running the real tiny model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from prometheus_client import CollectorRegistry

from services.worker.app import load_models
from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel
from services.worker.handlers import register_handlers
from services.worker.metrics import WorkerMetrics
from shared import topics
from shared.kafka import make_broker
from shared.messages import ChatMessage, ChatRequest, ChatResult, DeadLetter, ReplyRoute, RoutedJob, utcnow


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


def job(content: str = "hi", **request_fields: object) -> RoutedJob:
    request = ChatRequest(
        messages=[ChatMessage(role="user", content=content)],
        reply_to=ReplyRoute(topic=topics.REPLIES, partition=3),
        **request_fields,  # type: ignore[arg-type]
    )
    return RoutedJob(request_id=request.request_id, request=request, pool="light", model="tiny-light", score=0.1)


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
