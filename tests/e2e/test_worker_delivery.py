"""Worker behaviour on the real stack: batches form under load, deadlines skip work, SIGTERM loses nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared import topics
from shared.messages import CancelRequest, ChatMessage, ChatRequest, ChatResult, utcnow
from tests.e2e.harness import Stack
from tests.e2e.test_pipeline import fetch_row, result_of, wait_for_assignment


async def completions(stack: Stack, count: int, concurrency: int) -> list[str]:
    """Ids of `count` chat completions sent by `concurrency` clients at once."""
    body = {"model": "tiny-light", "messages": [{"role": "user", "content": "batch me"}], "max_tokens": 4}
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120, headers=stack.auth_headers) as client:

        async def one() -> None:
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])

        for start in range(0, count, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, count - start))))
    return ids


async def batch_sizes(stack: Stack, ids: list[str]) -> list[int]:
    """The batch size each request ran in, from PostgreSQL."""
    return [(await fetch_row(stack, "results", request_id))["batch_size"] for request_id in ids]


async def test_batches_form_under_concurrent_load_and_not_at_low_load(stack: Stack) -> None:
    alone = await batch_sizes(stack, await completions(stack, count=3, concurrency=1))
    together = await batch_sizes(stack, await completions(stack, count=24, concurrency=24))
    assert alone == [1, 1, 1]
    assert max(together) > 1, together


async def collect_results(consumer: AIOKafkaConsumer, wanted: set[str], limit_s: float) -> dict[str, ChatResult]:
    """Results on the results topic for the wanted request ids (the first of each)."""
    found: dict[str, ChatResult] = {}
    async with asyncio.timeout(limit_s):
        async for record in consumer:
            result = ChatResult.model_validate_json(record.value)
            if result.request_id in wanted:
                found.setdefault(result.request_id, result)
                if len(found) == len(wanted):
                    return found
    return found


async def test_sigterm_mid_batch_loses_nothing_and_expired_requests_are_skipped(stack: Stack) -> None:
    fresh = [
        ChatRequest(model="tiny-light", messages=[ChatMessage(role="user", content=f"keep {i}")], max_tokens=16)
        for i in range(40)
    ]
    expired = ChatRequest(
        model="tiny-light",
        messages=[ChatMessage(role="user", content="too late")],
        deadline=utcnow() - timedelta(seconds=1),
    )
    bootstrap = stack.infra.kafka_bootstrap
    consumer = AIOKafkaConsumer(topics.RESULTS, bootstrap_servers=bootstrap, group_id=f"test-{expired.request_id}")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    worker = next(service for service in stack.services if service.name == "worker-light")
    try:
        await wait_for_assignment(consumer)
        for request in [expired, *fresh]:
            await producer.send(topics.REQUESTS, request.model_dump_json().encode(), key=request.request_id.encode())
        await producer.flush()
        await asyncio.sleep(0.5)  # let the worker start on them
        assert await asyncio.to_thread(worker.stop) in (0, -15)  # graceful: finishes the batch in hand, commits
        await asyncio.to_thread(worker.start, stack.env)
        found = await collect_results(consumer, {r.request_id for r in [expired, *fresh]}, limit_s=120)
    finally:
        await producer.stop()
        await consumer.stop()
        await asyncio.to_thread(stack.wait_ready)
    assert len(found) == len(fresh) + 1, f"{len(fresh) + 1 - len(found)} requests lost"
    assert all(found[r.request_id].ok for r in fresh)
    skipped = found[expired.request_id]
    assert skipped.error is not None and skipped.error.code == "deadline_exceeded" and skipped.usage.total_tokens == 0


async def test_a_cancelled_request_is_answered_without_running(stack: Stack) -> None:
    request = ChatRequest(model="tiny-light", messages=[ChatMessage(role="user", content="cancel me")])
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        cancel = CancelRequest(request_id=request.request_id, reason="changed my mind")
        await producer.send_and_wait(topics.CONTROL, cancel.model_dump_json().encode())
    finally:
        await producer.stop()
    await asyncio.sleep(1.0)  # the control topic is read by its own consumer in each service
    result = await result_of(stack, request)
    assert result.error is not None and result.error.type == "cancelled"
    assert result.usage.total_tokens == 0


async def test_cancelling_over_http_stops_a_request_that_has_not_run(stack: Stack) -> None:
    request = ChatRequest(model="tiny-light", messages=[ChatMessage(role="user", content="cancel me over HTTP")])
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers) as client:
        response = await client.post(f"/v1/requests/{request.request_id}/cancel")
    assert response.status_code == 202
    assert response.json() == {"id": request.request_id, "object": "request.cancellation", "status": "cancelling"}
    await asyncio.sleep(1.0)  # the control topic is read by its own consumer in each service
    result = await result_of(stack, request)
    assert result.error is not None and result.error.code == "request_cancelled"
