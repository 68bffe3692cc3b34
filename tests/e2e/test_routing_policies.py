"""Routing policies on the real stack: threshold, explicit model, live pools, lag spill, breaker, priority lane.

Every test reads the router's explanation the way a user does: `GET /v1/requests/{id}` (`routing`),
or the `routing` of the result on Kafka. Tests that stop, pause or reconfigure a service put it back
as it was before they end.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.gateway.config import GatewaySettings
from services.gateway.idempotency import idempotent_request_id
from services.gateway.limits import RETRY_AFTER_MAX_S, Backlog
from services.router.config import RouterSettings
from services.router.load import PoolLoad
from shared import topics
from shared.messages import ChatMessage, ChatRequest, ChatResult, ErrorInfo, utcnow
from tests.e2e.harness import Service, Stack
from tests.e2e.test_pipeline import wait_for_assignment
from tests.e2e.test_registry import restore_heavy, wait_until, worker
from tests.e2e.test_request_tracking import admin_key_id, status_when_finished
from tests.e2e.test_router_scorer import HARD_MATH
from tests.e2e.test_worker_delivery import collect_results

HARD = HARD_MATH  # the learned scorer puts it well above the threshold (0.77)
# The tuned router: tiny lag bound, every auto request borderline, a breaker that opens after 2 errors.
TUNED_ROUTER = {
    "AUTOGLM_ROUTING__SPILL__MAX_LAG": "2",
    "AUTOGLM_ROUTING__SPILL__BAND": "1.0",
    "AUTOGLM_ROUTING__SPILL__LAG_CACHE_S": "0.01",  # a fresh reading for every batch
    "AUTOGLM_ROUTING__BREAKER__MIN_REQUESTS": "2",
    "AUTOGLM_ROUTING__BREAKER__OPEN_S": "3",
}


async def chat(stack: Stack, content: str, **fields: Any) -> dict[str, Any]:
    """POST /v1/chat/completions; the completion's JSON."""
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=90) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def routing_of(stack: Stack, request_id: str) -> dict[str, Any]:
    """The `routing` object of GET /v1/requests/{id}, once the result is stored."""
    status = await status_when_finished(stack, request_id)
    assert status["status"] == "completed", status
    return status["routing"]  # type: ignore[no-any-return]


def router(stack: Stack) -> Service:
    return next(service for service in stack.services if service.name == "router")


async def restart_router(stack: Stack, extra_env: dict[str, str] | None = None) -> None:
    """Restart the stack's router (with `extra_env`) and wait until it is ready."""
    service = router(stack)
    assert await asyncio.to_thread(service.stop) in (0, -15)
    service.start({**stack.env, **(extra_env or {})})
    await asyncio.to_thread(stack.wait_for, service, time.monotonic() + 120)


@pytest.fixture
async def tuned_router(stack: Stack) -> AsyncIterator[None]:
    """The router with TUNED_ROUTER's settings for one test, then with the stack's again."""
    await restart_router(stack, TUNED_ROUTER)
    try:
        yield
    finally:
        await restart_router(stack)


# The breaker of heavy opens after 2 errors and stays open for the test; heavy has no fallback.
NO_FALLBACK_ROUTER = {
    "AUTOGLM_ROUTING__BREAKER__MIN_REQUESTS": "2",
    "AUTOGLM_ROUTING__BREAKER__OPEN_S": "120",
    "AUTOGLM_ROUTING__FALLBACK": '{"heavy": null}',
}


@pytest.fixture
async def router_without_heavy_fallback(stack: Stack) -> AsyncIterator[None]:
    """The router with NO_FALLBACK_ROUTER's settings for one test, then with the stack's again."""
    await restart_router(stack, NO_FALLBACK_ROUTER)
    try:
        yield
    finally:
        await restart_router(stack)


@pytest.fixture
async def heavy_restored(stack: Stack) -> AsyncIterator[None]:
    yield
    await restore_heavy(stack)


async def test_simple_and_hard_prompts_reach_different_pools_and_the_request_explains_why(stack: Stack) -> None:
    simple, hard = await asyncio.gather(chat(stack, "hi"), chat(stack, HARD))
    assert (simple["model"], hard["model"]) == ("tiny-light", "tiny-heavy")
    simple_routing, hard_routing = await asyncio.gather(routing_of(stack, simple["id"]), routing_of(stack, hard["id"]))
    for routing, pool in ((simple_routing, "light"), (hard_routing, "heavy")):
        assert routing["policy"] == "threshold" and routing["threshold"] == 0.5
        assert routing["pool"] == routing["scored_pool"] == pool and routing["lane"] == "normal"
        assert set(routing["contributions"]) >= {"length", "math", "latex"}
    assert simple_routing["score"] < 0.5 <= hard_routing["score"]
    # The contributions are the score's terms: the hard prompt's add up to more.
    assert sum(hard_routing["contributions"].values()) > sum(simple_routing["contributions"].values())
    assert hard_routing["contributions"]["latex"] > simple_routing["contributions"]["latex"]


async def test_an_explicit_model_wins_over_the_score(stack: Stack) -> None:
    completion = await chat(stack, "hi", model="tiny-heavy")
    routing = await routing_of(stack, completion["id"])
    assert completion["model"] == "tiny-heavy"
    assert routing["policy"] == "explicit_model" and routing["pool"] == "heavy" and routing["score"] < 0.5


@pytest.mark.usefixtures("heavy_restored")
async def test_a_pool_with_no_live_workers_is_skipped(stack: Stack) -> None:
    assert await asyncio.to_thread(worker(stack, "heavy").stop) in (0, -15)  # SIGTERM: its cards are withdrawn
    completion: dict[str, Any] = {}

    async def went_to_light() -> bool:
        # the router's registry view catches up with the tombstone within moments
        completion.update(await chat(stack, HARD))
        return completion["model"] == "tiny-light"

    await wait_until(went_to_light, "a hard prompt served by light", 15)
    routing = await routing_of(stack, completion["id"])
    assert routing["policy"] == "no_live_workers" and routing["scored_pool"] == "heavy" and routing["pool"] == "light"
    assert routing["notes"] == ["pool heavy has no live workers: sent to light"]


def paused(service: Service) -> Any:
    """SIGSTOP `service` for the block (its consumer stops committing: lag grows), SIGCONT after."""

    class Pause:
        def __enter__(self) -> None:
            assert service.process is not None
            os.kill(service.process.pid, signal.SIGSTOP)

        def __exit__(self, *exc: object) -> None:
            assert service.process is not None
            os.kill(service.process.pid, signal.SIGCONT)

    return Pause()


async def pool_lag_reaches(stack: Stack, pool: str, at_least: int) -> None:
    """Wait until `pool`'s workers have at least `at_least` jobs waiting (read as the router reads it)."""
    load = PoolLoad(RouterSettings(kafka_bootstrap=stack.infra.kafka_bootstrap))
    await load.start()
    try:

        async def reached() -> bool:
            load._read_at = float("-inf")
            return (await load.lag()).get(pool, 0) >= at_least

        await wait_until(reached, f"lag of {pool} >= {at_least}", 15)
    finally:
        await load.stop()


async def publish(stack: Stack, *requests: ChatRequest) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for request in requests:
            await producer.send(topics.REQUESTS, request.model_dump_json().encode(), key=request.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


def ask(content: str, **fields: Any) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=content)], max_tokens=2, **fields)


@pytest.mark.usefixtures("tuned_router")
async def test_a_borderline_request_spills_from_a_backlogged_pool_and_nothing_is_dropped(stack: Stack) -> None:
    queued = [ask(f"wait {index}", model="tiny-heavy") for index in range(4)]
    with paused(worker(stack, "heavy")):
        await publish(stack, *queued)
        await pool_lag_reaches(stack, "heavy", 3)
        spilled = await chat(stack, HARD)
    assert spilled["model"] == "tiny-light"
    routing = await routing_of(stack, spilled["id"])
    assert routing["policy"] == "spill" and routing["scored_pool"] == "heavy" and routing["pool"] == "light"
    assert "pool heavy is backlogged (lag" in routing["notes"][0]
    for request in queued:  # the backlog still runs where it was sent
        assert (await routing_of(stack, request.request_id))["pool"] == "heavy"


async def publish_results(stack: Stack, *results: ChatResult) -> None:
    """Results as a failing worker of the pool would publish them (the router learns from these)."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for result in results:
            await producer.send_and_wait(
                topics.RESULTS, result.model_dump_json().encode(), key=result.request_id.encode()
            )
    finally:
        await producer.stop()


def failed_on_heavy() -> ChatResult:
    error = ErrorInfo(type="server_error", code="retries_exhausted", message="inference failed after 3 attempts")
    return ChatResult(request_id=f"chatcmpl-test-{uuid.uuid4().hex}", pool="heavy", error=error, created_at=utcnow())


@pytest.mark.usefixtures("tuned_router")
async def test_the_breaker_opens_on_errors_sends_to_the_fallback_and_recovers_through_a_probe(stack: Stack) -> None:
    await publish_results(stack, failed_on_heavy(), failed_on_heavy())
    fallback: dict[str, Any] = {}

    async def went_to_fallback() -> bool:
        answer = await chat(stack, HARD)
        routing = await routing_of(stack, answer["id"])
        if routing["policy"] != "breaker_fallback":
            # The router had not read the errors yet, or (just restarted) not yet heavy's card: a pool without
            # live workers has its breaker open for that reason, and errors then count for nothing. Again.
            await publish_results(stack, failed_on_heavy(), failed_on_heavy())
            return False
        fallback.update(answer, routing=routing)
        return True

    await wait_until(went_to_fallback, "a hard prompt sent to the fallback", 30)
    assert fallback["model"] == "tiny-light" and fallback["routing"]["scored_pool"] == "heavy"
    [note] = fallback["routing"]["notes"]
    assert re.fullmatch(
        r"breaker of heavy is open \(\d+ of the last \d+ results failed\): sent to fallback light", note
    )

    await asyncio.sleep(3)  # open_s: half-open, the next request is the probe
    probe = await chat(stack, HARD)
    assert probe["model"] == "tiny-heavy"
    recovered: dict[str, Any] = {}

    async def closed_again() -> bool:
        recovered.update(await chat(stack, HARD))
        return recovered["model"] == "tiny-heavy"

    await wait_until(closed_again, "the breaker closed after the probe's success", 10)
    assert (await routing_of(stack, recovered["id"]))["policy"] == "threshold"


async def test_a_priority_request_jumps_the_queue(stack: Stack) -> None:
    backlog = [ask(f"normal {index}", model="tiny-light") for index in range(80)]
    urgent = ask("urgent", model="tiny-light", priority=9)
    consumer = AIOKafkaConsumer(topics.RESULTS, bootstrap_servers=stack.infra.kafka_bootstrap)
    await consumer.start()
    try:
        await wait_for_assignment(consumer)
        with paused(worker(stack, "light")):
            await publish(stack, *backlog)
            await pool_lag_reaches(stack, "light", len(backlog))
            await publish(stack, urgent)
            await pool_lag_reaches(stack, "light", len(backlog) + 1)
        results = await collect_results(consumer, {request.request_id for request in [*backlog, urgent]}, 120)
    finally:
        await consumer.stop()
    done = results.pop(urgent.request_id).completed_at
    # Read in order, the urgent job (published last) would run in the third batch of 32; it ran in the first.
    later = sum(result.completed_at > done for result in results.values())
    assert later >= len(backlog) // 2, f"only {later} of {len(backlog)} earlier requests finished after it"
    routing = await routing_of(stack, urgent.request_id)
    assert routing["lane"] == "priority" and routing["policy"] == "explicit_model"


@pytest.mark.usefixtures("router_without_heavy_fallback")
async def test_an_open_breaker_without_fallback_is_a_fast_503_pool_unavailable(stack: Stack) -> None:
    await publish_results(stack, failed_on_heavy(), failed_on_heavy())
    caller = await admin_key_id(stack)
    refused: dict[str, Any] = {}

    async def answered_unavailable() -> bool:
        key = f"unavailable-{uuid.uuid4()}"  # its request id is known to the client: Idempotency-Key
        body = {"model": "auto", "messages": [{"role": "user", "content": HARD}], "max_tokens": 2}
        headers = {**stack.auth_headers, "Idempotency-Key": key}
        async with httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=90) as http:
            started = time.monotonic()
            response = await http.post("/v1/chat/completions", json=body)
        refused.update(response=response, seconds=time.monotonic() - started, id=idempotent_request_id(caller, key))
        return response.status_code != 200  # a 200 from heavy: the router has not seen both errors yet

    await wait_until(answered_unavailable, "a hard prompt answered pool_unavailable", 10)
    response: httpx.Response = refused["response"]
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "pool_unavailable")
    assert "breaker of heavy is open" in error["message"] and "retry later" in error["message"]
    assert refused["seconds"] < 5, f"took {refused['seconds']:.1f} s: it waited instead of failing fast"
    status = await status_when_finished(stack, refused["id"])
    assert status["status"] == "failed" and status["error"]["code"] == "pool_unavailable"
    routing = status["routing"]
    assert routing["policy"] == "pool_unavailable" and routing["pool"] is None and routing["scored_pool"] == "heavy"
    (note,) = routing["notes"]
    assert note.startswith("breaker of heavy is open (") and note.endswith("and no fallback can take it")


async def test_the_gateways_retry_after_counts_jobs_waiting_in_a_priority_lane(stack: Stack) -> None:
    urgent = [ask(f"urgent {index}", model="tiny-light", priority=9) for index in range(3)]
    backlog = Backlog(GatewaySettings(kafka_bootstrap=stack.infra.kafka_bootstrap), cache_s=0)
    try:
        with paused(worker(stack, "light")):
            await publish(stack, *urgent)
            await pool_lag_reaches(stack, "light", len(urgent))
            # Queued work and no completion seen yet by this reader: the longest wait. Had the priority
            # lane not counted, nothing would be queued and the answer would be the shortest, 1 s.
            assert await backlog.retry_after_s() == RETRY_AFTER_MAX_S
    finally:
        await backlog.close()
    for request in urgent:  # the lane is worked off once the pool runs again
        assert (await routing_of(stack, request.request_id))["lane"] == "priority"
