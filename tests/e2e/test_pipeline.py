"""The whole path on real Kafka and PostgreSQL: HTTP -> gateway -> router -> worker -> gateway, and the exporter."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import asyncpg
import httpx
import openai
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import RecordMetadata

from shared import topics
from shared.messages import ChatMessage, ChatRequest, ChatResult, DeadLetter
from tests.e2e.harness import Stack


def plain_dsn(url: str) -> str:
    """asyncpg wants postgresql://, SQLAlchemy's URL says postgresql+asyncpg://."""
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def fetch_row(stack: Stack, table: str, request_id: str, limit_s: float = 30.0) -> asyncpg.Record:
    """Poll PostgreSQL until the exporter has stored the row (it writes in batches)."""
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        deadline = asyncio.get_running_loop().time() + limit_s
        while True:
            row = await connection.fetchrow(f"SELECT * FROM {table} WHERE request_id = $1", request_id)
            if row is not None or asyncio.get_running_loop().time() > deadline:
                assert row is not None, f"{request_id} not in {table} after {limit_s} s"
                return row
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0, timeout=90)


def test_chat_completion_returns_text_from_the_tiny_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "tiny-light"
    assert completion.choices[0].message.role == "assistant"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 16  # tiny-light's default_max_tokens


async def test_request_and_result_land_in_postgresql_under_the_same_id(client: openai.OpenAI, stack: Stack) -> None:
    completion = await asyncio.to_thread(
        client.chat.completions.create,
        model="tiny-heavy", messages=[{"role": "user", "content": "store me"}], max_tokens=5, temperature=0,
    )  # fmt: skip
    request = await fetch_row(stack, "requests", completion.id)
    result = await fetch_row(stack, "results", completion.id)
    assert request["model"] == "tiny-heavy"
    assert json.loads(request["messages"]) == [{"role": "user", "content": "store me"}]
    assert result["status"] == "ok" and result["pool"] == "heavy"
    assert result["content"] == completion.choices[0].message.content
    assert result["completion_tokens"] == completion.usage.completion_tokens  # type: ignore[union-attr]


def test_unknown_model_is_an_openai_404(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json={"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]},
        headers=stack.auth_headers,
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_unsupported_field_is_a_400_naming_it(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 2}},
        headers=stack.auth_headers,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logit_bias"


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"auto", "light", "heavy", "tiny-light", "tiny-heavy"} <= ids


async def wait_for_assignment(consumer: AIOKafkaConsumer) -> None:
    """Block until the group gave this consumer its partitions and their positions are known."""
    async with asyncio.timeout(30):
        while not consumer.assignment():  # noqa: ASYNC110 - aiokafka offers no assignment event
            await asyncio.sleep(0.1)
        for partition in consumer.assignment():
            await consumer.position(partition)


async def publish_and_read(
    stack: Stack, *, send: bytes, key: bytes | None, watch: str, match: Callable[[bytes], bool]
) -> bytes:
    """Publish `send` to the requests topic and return the first record on `watch` that `match`es."""
    bootstrap = stack.infra.kafka_bootstrap
    group = f"test-{uuid.uuid4()}"
    consumer = AIOKafkaConsumer(watch, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="latest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        await wait_for_assignment(consumer)
        await producer.send_and_wait(topics.REQUESTS, send, key=key)
        async with asyncio.timeout(60):
            async for record in consumer:
                if match(record.value):
                    return record.value  # type: ignore[no-any-return]
    finally:
        await producer.stop()
        await consumer.stop()
    raise AssertionError("the consumer stopped")


async def result_of(stack: Stack, request: ChatRequest) -> ChatResult:
    """Publish `request` straight to Kafka, as any producer would, and read its result."""
    raw = await publish_and_read(
        stack,
        send=request.model_dump_json().encode(),
        key=request.request_id.encode(),
        watch=topics.RESULTS,
        match=lambda value: ChatResult.model_validate_json(value).request_id == request.request_id,
    )
    return ChatResult.model_validate_json(raw)


async def test_a_producer_without_the_gateway_reads_its_result(stack: Stack) -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="straight to Kafka")], max_tokens=4)
    result = await result_of(stack, request)
    assert result.ok and result.choices[0].message.role == "assistant"
    assert result.usage.completion_tokens <= 4


async def test_malformed_message_is_dead_lettered_and_the_router_keeps_going(
    client: openai.OpenAI, stack: Stack
) -> None:
    marker = f"garbage-{uuid.uuid4()}"
    raw = await publish_and_read(
        stack,
        send=f"{{{marker}".encode(),
        key=None,
        watch=topics.DEADLETTER,
        match=lambda value: marker in DeadLetter.model_validate_json(value).payload,
    )
    letter = DeadLetter.model_validate_json(raw)
    assert letter.service == "router" and letter.source_topic == topics.REQUESTS
    completion = await asyncio.to_thread(
        client.chat.completions.create, model="auto", messages=[{"role": "user", "content": "still there?"}]
    )
    assert completion.choices[0].message.content is not None


async def test_a_redelivered_request_never_duplicates_a_row(stack: Stack) -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="twice")], max_tokens=2)
    bootstrap = stack.infra.kafka_bootstrap
    results = AIOKafkaConsumer(topics.RESULTS, bootstrap_servers=bootstrap, group_id=f"test-{uuid.uuid4()}")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await results.start()
    await producer.start()
    try:
        await wait_for_assignment(results)
        sent = [
            await producer.send_and_wait(topics.REQUESTS, request.model_dump_json().encode(), key=b"same")
            for _ in range(2)
        ]
        copies = await read_results_of(results, request.request_id, count=2)
    finally:
        await producer.stop()
        await results.stop()
    # Requests and results are stored by separate subscribers: wait for both commits.
    await wait_until_exporter_committed(bootstrap, sent[-1])
    await wait_until_exporter_committed(bootstrap, copies[-1])
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        for table in ("requests", "results"):
            count = await connection.fetchval(f"SELECT count(*) FROM {table} WHERE request_id = $1", request.request_id)
            assert count == 1, f"{count} rows in {table}"
    finally:
        await connection.close()


async def read_results_of(consumer: AIOKafkaConsumer, request_id: str, count: int) -> list[ConsumerRecord]:
    """The first `count` result records of `request_id`."""
    found: list[ConsumerRecord] = []
    async with asyncio.timeout(60):
        async for record in consumer:
            if ChatResult.model_validate_json(record.value).request_id == request_id:
                found.append(record)
                if len(found) == count:
                    return found
    raise AssertionError("the consumer stopped")


async def wait_until_exporter_committed(bootstrap: str, record: ConsumerRecord | RecordMetadata) -> None:
    """Block until the exporter's group for the record's topic has committed past it, i.e. stored it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    partition = TopicPartition(record.topic, record.partition)
    try:
        async with asyncio.timeout(30):
            while True:
                offsets = await admin.list_consumer_group_offsets(f"autoglm-exporter-{record.topic}")
                if partition in offsets and offsets[partition].offset > record.offset:
                    return
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def test_an_unstorable_row_is_dead_lettered_and_does_not_block_its_partition(stack: Stack) -> None:
    # NUL is valid JSON but not valid PostgreSQL text: stored with a replacement character.
    with_nul = ChatRequest(messages=[ChatMessage(role="user", content="a\x00b")], max_tokens=1)
    # A model name longer than the column: PostgreSQL refuses the row whatever we do.
    too_long = ChatRequest(messages=[ChatMessage(role="user", content="hi")], model="m" * 300)
    raw = await publish_and_read(
        stack,
        send=too_long.model_dump_json().encode(),
        key=b"one-partition",
        watch=topics.DEADLETTER,
        match=lambda value: DeadLetter.model_validate_json(value).service == "exporter",
    )
    letter = DeadLetter.model_validate_json(raw)
    assert letter.request_id == too_long.request_id and "too long" in letter.reason
    producer = AIOKafkaProducer(bootstrap_servers=stack.infra.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topics.REQUESTS, with_nul.model_dump_json().encode(), key=b"one-partition")
    finally:
        await producer.stop()
    row = await fetch_row(stack, "requests", with_nul.request_id)
    assert json.loads(row["messages"])[0]["content"] == "a\ufffdb"


def test_one_trace_id_follows_the_request_through_the_services(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 1},
        headers=stack.auth_headers,
        timeout=60,
    )
    trace_id = response.headers["X-Trace-Id"]
    assert response.status_code == 200 and len(trace_id) == 32
    router_log = next(service for service in stack.services if service.name == "router").log_path.read_text()
    routed = [json.loads(line) for line in router_log.splitlines() if trace_id in line]
    assert any(
        entry.get("request_id") == response.json()["id"] and entry["message"].startswith("routed to")
        for entry in routed
    )
