"""Async mode, request status, feedback and Idempotency-Key on the real stack (Kafka + PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from services.gateway.idempotency import idempotent_request_id
from shared import topics
from shared.db.keys import hash_key
from shared.messages import ChatMessage, ChatRequest, utcnow
from tests.e2e.harness import Stack
from tests.e2e.test_pipeline import fetch_row, plain_dsn, result_of

ASYNC = {"Prefer": "respond-async"}


def chat_body(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 3, **fields}


async def status_when_finished(stack: Stack, request_id: str, limit_s: float = 60.0) -> dict[str, Any]:
    """GET /v1/requests/{id} until it is no longer queued and its request row is stored too (404 until the
    exporter stored something; requests and results are stored by separate consumers, in either order)."""
    async with (
        httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=10) as http,
        asyncio.timeout(limit_s),
    ):
        while True:
            response = await http.get(f"/v1/requests/{request_id}")
            if response.status_code == 200 and response.json()["status"] != "queued" and response.json()["model"]:
                return response.json()  # type: ignore[no-any-return]
            assert response.status_code in (200, 404), response.text
            await asyncio.sleep(0.2)


async def publish_raw(stack: Stack, *requests: ChatRequest) -> None:
    """Publish requests straight to Kafka, as a producer without the gateway does (no trace headers)."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for request in requests:
            await producer.send_and_wait(
                topics.REQUESTS, request.model_dump_json().encode(), key=request.request_id.encode()
            )
    finally:
        await producer.stop()


def times_routed(stack: Stack, request_id: str) -> int:
    """How often the router routed `request_id`, from its JSON log."""
    log = next(service for service in stack.services if service.name == "router").log_path.read_text()
    entries = [json.loads(line) for line in log.splitlines() if request_id in line]
    return sum(entry.get("request_id") == request_id and entry["message"].startswith("routed to") for entry in entries)


async def test_async_mode_answers_202_then_the_request_reports_its_result_routing_and_trace(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=10) as http:
        accepted = await http.post("/v1/chat/completions", json=chat_body("async please"), headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]
    assert accepted.json() == {
        "id": request_id, "object": "chat.completion.request", "status": "queued", "created": accepted.json()["created"]
    }  # fmt: skip
    assert accepted.headers["Location"] == f"/v1/requests/{request_id}"
    assert accepted.headers["Preference-Applied"] == "respond-async"

    status = await status_when_finished(stack, request_id)
    assert status["status"] == "completed" and status["model"] == "auto"
    assert status["result"]["id"] == request_id and status["result"]["object"] == "chat.completion"
    assert status["result"]["choices"][0]["message"]["role"] == "assistant"
    assert 0 < status["result"]["usage"]["completion_tokens"] <= 3
    routing = status["routing"]
    assert routing["pool"] == "light" and routing["model"] == "tiny-light" and 0 <= routing["score"] < 0.5
    assert routing["reasons"][0].startswith("score ") and "threshold" in routing["reasons"][0]
    assert status["attempts"] == 1 and status["error"] is None
    assert status["trace_id"] == accepted.headers["X-Trace-Id"]  # the exporter read the record's traceparent
    assert datetime.fromisoformat(status["completed_at"]) >= datetime.fromisoformat(status["created_at"])


async def test_a_request_a_producer_published_straight_to_kafka_has_a_status(stack: Stack) -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="no gateway")], max_tokens=3, model="heavy")
    result = await result_of(stack, request)
    status = await status_when_finished(stack, request.request_id)
    assert status["status"] == "completed" and status["model"] == "heavy"
    assert status["result"]["choices"][0]["message"]["content"] == result.choices[0].message.content
    routing = status["routing"]
    assert {key: routing[key] for key in ("pool", "model", "score", "reasons", "policy", "scored_pool")} == {
        "pool": "heavy",
        "model": "tiny-heavy",
        "score": result.score,
        "reasons": ["explicit pool"],
        "policy": "explicit_pool",
        "scored_pool": "heavy",
    }
    assert status["attempts"] == 1 and status["trace_id"] is None  # a bare producer sends no traceparent


async def test_failed_and_expired_requests_say_why(stack: Stack) -> None:
    unroutable = ChatRequest(messages=[ChatMessage(role="user", content="hi")], model="gpt-17")
    late = ChatRequest(messages=[ChatMessage(role="user", content="hi")], deadline=utcnow() - timedelta(seconds=1))
    await publish_raw(stack, unroutable, late)
    failed = await status_when_finished(stack, unroutable.request_id)
    expired = await status_when_finished(stack, late.request_id)
    assert failed["status"] == "failed" and failed["result"] is None
    assert failed["error"]["code"] == "model_not_found" and "gpt-17" in failed["error"]["message"]
    assert failed["routing"]["reasons"] == ["unroutable: no pool serves model 'gpt-17'"]
    assert expired["status"] == "expired" and expired["error"]["code"] == "deadline_exceeded"


def test_an_unknown_request_is_an_openai_404(stack: Stack) -> None:
    response = httpx.get(f"{stack.gateway_url}/v1/requests/chatcmpl-{uuid.uuid4().hex}", headers=stack.auth_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "request_not_found"
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/requests/chatcmpl-%00"), ("POST", "/v1/requests/x%00/cancel")]
)
def test_an_id_postgresql_cannot_hold_is_an_unknown_request(stack: Stack, method: str, path: str) -> None:
    response = httpx.request(method, f"{stack.gateway_url}{path}", headers=stack.auth_headers)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "request_not_found"


async def test_feedback_is_stored_in_postgresql(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=60) as http:
        completion = (await http.post("/v1/chat/completions", json=chat_body("rate me"))).json()
        sent = await http.post(
            "/v1/feedback", json={"request_id": completion["id"], "score": -1, "comment": "not helpful"}
        )
    assert sent.status_code == 202, sent.text
    assert sent.json()["object"] == "feedback" and sent.json()["request_id"] == completion["id"]
    row = await fetch_row(stack, "feedback", completion["id"])
    assert row["feedback_id"] == sent.json()["id"]
    assert row["score"] == -1.0 and row["comment"] == "not helpful"


def test_bad_feedback_is_a_400_naming_the_field(stack: Stack) -> None:
    def refused(body: dict[str, Any]) -> str:
        response = httpx.post(f"{stack.gateway_url}/v1/feedback", json=body, headers=stack.auth_headers)
        assert response.status_code == 400, response.text
        return response.json()["error"]["param"]  # type: ignore[no-any-return]

    assert refused({"request_id": "chatcmpl-x", "score": 2}) == "score"
    assert refused({"score": 1}) == "request_id"
    assert refused({"request_id": "chatcmpl-x", "score": 1, "comment": "x" * 2001}) == "comment"


async def count_rows(stack: Stack, request_id: str) -> dict[str, int]:
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        return {
            table: await connection.fetchval(f"SELECT count(*) FROM {table} WHERE request_id = $1", request_id)
            for table in ("requests", "results")
        }
    finally:
        await connection.close()


async def test_the_same_idempotency_key_runs_the_request_once(stack: Stack) -> None:
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = chat_body("only once", temperature=1.0)
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=90) as http:
        first, second = await asyncio.gather(
            http.post("/v1/chat/completions", json=body, headers=headers),
            http.post("/v1/chat/completions", json=body, headers=headers),
        )
        third = await http.post("/v1/chat/completions", json=body, headers=headers)
    answers = [first, second, third]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert len({json.dumps(answer.json()["choices"]) for answer in answers}) == 1  # sampled, yet the same text
    assert sorted(answer.headers.get("Idempotent-Replayed", "false") for answer in answers) == ["false", "true", "true"]
    request_id = first.json()["id"]
    await fetch_row(stack, "results", request_id)
    assert await count_rows(stack, request_id) == {"requests": 1, "results": 1}
    assert times_routed(stack, request_id) == 1


async def admin_key_id(stack: Stack) -> str:
    """The key id the gateway gave the stack's admin key (idempotency keys are scoped to a caller)."""
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        key_id: str = await connection.fetchval(
            "SELECT key_id FROM api_keys WHERE key_hash = $1", hash_key(stack.api_key)
        )
        return key_id
    finally:
        await connection.close()


async def test_a_retry_after_a_restart_replays_the_stored_result(stack: Stack) -> None:
    # Another gateway (or this one before a restart) ran the first attempt: only PostgreSQL knows it.
    key = f"order-{uuid.uuid4()}"
    caller = await admin_key_id(stack)
    first = ChatRequest(
        request_id=idempotent_request_id(caller, key),
        messages=[ChatMessage(role="user", content="ran before")],
        max_tokens=3,
        caller=caller,
    )
    result = await result_of(stack, first)
    await fetch_row(stack, "results", first.request_id)
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=90) as http:
        other = await http.post("/v1/chat/completions", json=chat_body("not that"), headers={"Idempotency-Key": key})
        retry = await http.post("/v1/chat/completions", json=chat_body("ran before"), headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert retry.status_code == 200, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == first.request_id
    assert retry.json()["choices"][0]["message"]["content"] == result.choices[0].message.content
    assert retry.json()["usage"]["total_tokens"] == result.usage.total_tokens
    assert times_routed(stack, first.request_id) == 1


async def test_an_async_request_with_a_key_is_queued_once_and_a_waiting_retry_gets_its_result(stack: Stack) -> None:
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = chat_body("async and keyed")
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=90) as http:
        queued = await http.post("/v1/chat/completions", json=body, headers={**headers, **ASYNC})
        again = await http.post("/v1/chat/completions", json=body, headers={**headers, **ASYNC})
        waited = await http.post("/v1/chat/completions", json=body, headers=headers)
    assert queued.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in queued.headers
    assert waited.status_code == 200, waited.text
    assert queued.json()["id"] == again.json()["id"] == waited.json()["id"]
    status = await status_when_finished(stack, waited.json()["id"])
    assert status["result"]["choices"] == waited.json()["choices"]
    assert times_routed(stack, waited.json()["id"]) == 1


async def test_the_same_key_with_another_body_is_a_422(stack: Stack) -> None:
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=90) as http:
        first = await http.post("/v1/chat/completions", json=chat_body("one body"), headers=headers)
        other = await http.post("/v1/chat/completions", json=chat_body("another body"), headers=headers)
    assert first.status_code == 200
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["param"] == "Idempotency-Key"
