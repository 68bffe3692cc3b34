"""Router subscriber on FastStream's in-memory broker: routing, unroutable, malformed input."""

from __future__ import annotations

import pytest
from faststream.kafka import TestKafkaBroker

from services.router.app import create_app
from services.router.config import RouterSettings
from shared import topics
from shared.messages import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    DeadLetter,
    ErrorInfo,
    ReplyRoute,
    RoutedJob,
    new_request_id,
    utcnow,
)


def request(content: str, model: str = "auto") -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content=content)])


@pytest.fixture
def app(router_settings: RouterSettings):
    return create_app(router_settings)


async def test_simple_and_hard_prompts_reach_different_pools(app) -> None:
    broker = app.broker
    async with TestKafkaBroker(broker) as br:
        light_jobs = br.subscriber(topics.jobs_topic("light"))(lambda m: None)  # type: ignore[arg-type]
        heavy_jobs = br.subscriber(topics.jobs_topic("heavy"))(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        await br.publish(request("hi"), topics.REQUESTS)
        hard = "Explain step by step why this proof is wrong and derive the integral:\n" + "x" * 800
        await br.publish(request(hard), topics.REQUESTS)

        light = RoutedJob.model_validate(light_jobs.mock.call_args.args[0])
        heavy = RoutedJob.model_validate(heavy_jobs.mock.call_args.args[0])
    assert light.request.messages[0].content == "hi" and light.model == "tiny-light"
    assert heavy.model == "tiny-heavy" and heavy.score >= 0.5
    assert any("reasoning" in reason for reason in heavy.reasons)


async def test_explicit_model_wins_over_score(app) -> None:
    async with TestKafkaBroker(app.broker) as br:
        heavy_jobs = br.subscriber(topics.jobs_topic("heavy"))(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        await br.publish(request("hi", model="tiny-heavy"), topics.REQUESTS)
        job = RoutedJob.model_validate(heavy_jobs.mock.call_args.args[0])
    assert job.reasons == ["explicit model"] and job.score < 0.5


async def test_unknown_model_gets_an_error_result_on_the_reply_route(app) -> None:
    async with TestKafkaBroker(app.broker) as br:
        replies = br.subscriber(topics.REPLIES)(lambda m: None)  # type: ignore[arg-type]
        letters = br.subscriber(topics.DEADLETTER)(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        req = request("hi", model="gpt-17").model_copy(
            update={"reply_to": ReplyRoute(topic=topics.REPLIES, partition=0)}
        )
        await br.publish(req, topics.REQUESTS)
        result = ChatResult.model_validate(replies.mock.call_args.args[0])
        letter = DeadLetter.model_validate(letters.mock.call_args.args[0])
    assert result.request_id == req.request_id
    assert result.error is not None and result.error.code == "model_not_found"
    assert result.reasons == ["unroutable: no pool serves model 'gpt-17'"]
    assert "gpt-17" in letter.reason


async def test_malformed_message_is_dead_lettered_and_next_request_still_routed(app) -> None:
    async with TestKafkaBroker(app.broker) as br:
        letters = br.subscriber(topics.DEADLETTER)(lambda m: None)  # type: ignore[arg-type]
        light_jobs = br.subscriber(topics.jobs_topic("light"))(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        await br.publish(b"{not json", topics.REQUESTS)
        await br.publish({"request_id": "x", "messages": []}, topics.REQUESTS)
        await br.publish(request("hi"), topics.REQUESTS)
        assert letters.mock.call_count == 2
        first = DeadLetter.model_validate(letters.mock.call_args_list[0].args[0])
        assert first.payload == "{not json" and first.source_topic == topics.REQUESTS
        assert light_jobs.mock.call_count == 1


async def test_a_high_priority_request_takes_the_priority_lane_with_its_explanation(app) -> None:
    async with TestKafkaBroker(app.broker) as br:
        urgent_jobs = br.subscriber(topics.priority_topic("light"))(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        await br.publish(request("hi").model_copy(update={"priority": 9}), topics.REQUESTS)
        job = RoutedJob.model_validate(urgent_jobs.mock.call_args.args[0])
    assert job.routing is not None and job.routing.lane == "priority" and job.routing.policy == "threshold"
    assert job.routing.score == job.score and set(job.routing.contributions) >= {"length", "reasoning"}


async def test_failing_results_open_the_breaker_and_auto_requests_go_to_the_fallback(app) -> None:
    hard = "Explain step by step why this proof is wrong and derive the integral:\n" + "x" * 800
    failed = ErrorInfo(type="server_error", code="retries_exhausted", message="boom")
    async with TestKafkaBroker(app.broker) as br:
        light_jobs = br.subscriber(topics.jobs_topic("light"))(lambda m: None)  # type: ignore[arg-type]
        await br.start()
        for _ in range(10):  # breaker.min_requests in the deployment file, all failed
            result = ChatResult(request_id=new_request_id(), pool="heavy", error=failed, created_at=utcnow())
            await br.publish(result, topics.RESULTS)
        await br.publish(request(hard), topics.REQUESTS)
        job = RoutedJob.model_validate(light_jobs.mock.call_args.args[0])
    assert job.routing is not None and job.routing.policy == "breaker_fallback" and job.routing.scored_pool == "heavy"
