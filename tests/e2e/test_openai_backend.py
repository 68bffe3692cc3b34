"""The openai backend with our own gateway as the OpenAI-compatible upstream.

Directly: OpenAIBackend against the stack's gateway. Through a worker: an extra worker process for a
`relay` pool (backend openai, models pointing at the stack's gateway) fed straight from Kafka, since
the stack's router does not know that pool. Its answers travel relay worker -> gateway -> router ->
light worker -> gateway -> relay worker -> autoglm.results.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.worker.backends.base import GenerationInput, TransientBackendError
from services.worker.backends.openai_backend import OpenAIBackend
from shared import topics
from shared.kafka import ensure_topics
from shared.messages import ChatMessage, ChatRequest, ChatResult, RoutedJob
from shared.settings import DEFAULT_CONFIG_FILE, CommonSettings, ModelConfig
from tests.e2e.harness import Service, Stack, worker_service
from tests.local_server import closed_port

RELAY_KEY_ENV = "AUTOGLM_TEST_RELAY_KEY"


def ask(request_id: str, content: str, **options: Any) -> GenerationInput:
    settings: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, **options}
    return GenerationInput(request_id, [ChatMessage(role="user", content=content)], **settings)


def gateway_model(stack: Stack, upstream_model: str, **fields: Any) -> ModelConfig:
    """A model behind the stack's gateway, called with the key in RELAY_KEY_ENV (see `relay_key`)."""
    return ModelConfig(
        id="relay-light",
        endpoint=f"{stack.gateway_url}/v1",
        upstream_model=upstream_model,
        api_key_env=RELAY_KEY_ENV,
        **fields,
    )


@pytest.fixture
def relay_key(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> str:
    """The stack's key in RELAY_KEY_ENV, where backends built in this process look for it."""
    monkeypatch.setenv(RELAY_KEY_ENV, stack.api_key)
    return stack.api_key


@pytest.fixture
async def relay(stack: Stack, relay_key: str) -> AsyncIterator[OpenAIBackend]:
    """A backend whose upstream is the stack's gateway serving tiny-light."""
    backend = OpenAIBackend.from_config(gateway_model(stack, "tiny-light", timeout_s=60), max_connections=4)
    yield backend
    await backend.aclose()


# ------------------------------------------------------------------------- the backend, directly


async def test_a_batch_of_three_comes_back_in_order_from_the_upstream_model(relay: OpenAIBackend) -> None:
    batch = [
        ask("one", "the first question", max_tokens=1),
        ask("two", "a second, different question", max_tokens=3),
        ask("three", "and a third one about lighthouses", max_tokens=6),
    ]
    outputs = await relay.agenerate(batch)
    assert [output.request_id for output in outputs] == ["one", "two", "three"]
    # Greedy decoding on the tiny model never ends early here: each answer is exactly as long as its
    # max_tokens, so a mixed-up order would show.
    assert [output.completion_tokens for output in outputs] == [1, 3, 6]
    assert [output.finish_reason for output in outputs] == ["length"] * 3
    assert all(output.prompt_tokens > 0 and output.error is None for output in outputs)
    alone = [(await relay.agenerate([request]))[0].text for request in batch]
    assert [output.text for output in outputs] == alone


async def test_a_request_the_upstream_refuses_is_an_error_and_its_companions_are_answered(
    relay: OpenAIBackend,
) -> None:
    outputs = await relay.agenerate([ask("ok-1", "hi"), ask("bad", "hi", temperature=3.5), ask("ok-2", "hello")])
    assert [output.finish_reason for output in outputs] == ["length", "error", "length"]
    assert outputs[1].error is not None and "temperature" in outputs[1].error  # the gateway's 400, verbatim
    assert outputs[0].completion_tokens == outputs[2].completion_tokens == 8


@pytest.mark.usefixtures("relay_key")
async def test_an_unknown_upstream_model_is_an_error_output_with_the_upstream_message(stack: Stack) -> None:
    missing = OpenAIBackend.from_config(gateway_model(stack, "no-such-model"), max_connections=2)
    try:
        outputs = await missing.agenerate([ask("a", "hi"), ask("b", "hello")])
    finally:
        await missing.aclose()
    assert [output.finish_reason for output in outputs] == ["error", "error"]
    assert outputs[0].error == "The model 'no-such-model' does not exist"


async def test_an_unreachable_endpoint_is_a_transient_failure() -> None:
    down = OpenAIBackend.from_config(
        ModelConfig(id="down", endpoint=f"http://127.0.0.1:{closed_port()}/v1"), max_connections=2
    )
    try:
        with pytest.raises(TransientBackendError, match="unreachable: ConnectError"):
            await down.agenerate([ask("a", "hi"), ask("b", "hi")])
    finally:
        await down.aclose()


# ---------------------------------------------------------------------------------------- streaming


async def test_streamed_deltas_add_up_to_the_non_streamed_answer(relay: OpenAIBackend) -> None:
    # Streamed first: the gateway streams it from the worker in pieces (and caches the greedy answer,
    # so the plain call after it must say the same).
    request = ask("streamed", "tell me a story about a lighthouse", max_tokens=12)
    deltas = [delta async for delta in relay.astream(request)]
    [whole] = await relay.agenerate([request])
    assert whole.text and len(deltas) > 1
    assert "".join(deltas) == whole.text


async def test_a_streamed_batch_hands_each_delta_on_and_counts_usage(relay: OpenAIBackend) -> None:
    batch = [ask("a", "tell me about the sea", max_tokens=10, stream=True), ask("b", "hello", max_tokens=4)]
    deltas: dict[str, list[str]] = {}
    outputs = await relay.agenerate(batch, lambda request_id, delta: deltas.setdefault(request_id, []).append(delta))
    assert list(deltas) == ["a"] and "".join(deltas["a"]) == outputs[0].text
    assert outputs[0].completion_tokens > 0 and outputs[0].prompt_tokens > 0  # from the stream's usage chunk
    assert outputs[1].text


# ------------------------------------------------------------------------------ through a relay worker


def relay_deployment(stack: Stack, path: Path) -> Path:
    """The normal deployment file plus a `relay` pool whose models live behind the stack's gateway."""
    deployment = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    gateway = f"{stack.gateway_url}/v1"
    key = {"api_key_env": RELAY_KEY_ENV}
    deployment["pools"]["relay"] = {
        "backend": "openai",
        "partitions": 2,
        "batching": {"enabled": True, "max_batch_size": 4, "max_wait_ms": 20},
        "models": [
            {"id": "relay-light", "endpoint": gateway, "upstream_model": "tiny-light", **key},
            {"id": "relay-missing", "endpoint": gateway, "upstream_model": "no-such-model", **key},
            {"id": "relay-down", "endpoint": f"http://127.0.0.1:{closed_port()}/v1", "timeout_s": 5},
        ],
    }
    path.write_text(yaml.safe_dump(deployment))
    return path


def wait_ready(service: Service, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{service.port}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert service.process is not None
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service.name} not ready:\n{service.log_tail()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def relay_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A worker process for the relay pool, started with AUTOGLM_CONFIG_FILE pointing at the relay deployment."""
    path = relay_deployment(stack, tmp_path_factory.mktemp("relay") / "deployment.yaml")
    # The relay pool's topics, from the same file the worker reads (the worker would create them too).
    pools = yaml.safe_load(path.read_text())["pools"]
    asyncio.run(ensure_topics(CommonSettings(kafka_bootstrap=stack.infra.kafka_bootstrap, pools=pools)))
    worker = worker_service("relay", closed_port())
    worker.env.update({"AUTOGLM_CONFIG_FILE": str(path), RELAY_KEY_ENV: stack.api_key})
    worker.start(stack.env)
    try:
        wait_ready(worker)
        yield worker
    finally:
        code = worker.stop()
    assert code in (0, -15), f"relay worker exit code {code}:\n{worker.log_tail()}"
    assert "Application shutdown complete" in worker.log_tail()


def relay_job(model: str, content: str, **options: Any) -> RoutedJob:
    request = ChatRequest(model=model, messages=[ChatMessage(role="user", content=content)], **options)
    return RoutedJob(request=request, pool="relay", model=model, score=0.0, reasons=["test: straight to the relay"])


async def run_on_relay(stack: Stack, jobs: list[RoutedJob], limit_s: float = 60.0) -> dict[str, ChatResult]:
    """Publish jobs to autoglm.jobs.relay and collect their results from autoglm.results."""
    bootstrap = stack.infra.kafka_bootstrap
    consumer = AIOKafkaConsumer(
        topics.RESULTS, bootstrap_servers=bootstrap, group_id=f"test-{uuid.uuid4()}", auto_offset_reset="latest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        async with asyncio.timeout(30):
            while not consumer.assignment():  # noqa: ASYNC110 - aiokafka offers no assignment event
                await asyncio.sleep(0.1)
            for partition in consumer.assignment():
                await consumer.position(partition)
        for job in jobs:
            body, key = job.model_dump_json().encode(), job.request_id.encode()
            await producer.send_and_wait(topics.jobs_topic("relay"), body, key=key)
        wanted = {job.request_id for job in jobs}
        results: dict[str, ChatResult] = {}
        async with asyncio.timeout(limit_s):
            async for record in consumer:
                result = ChatResult.model_validate_json(record.value)
                if result.request_id in wanted:
                    results[result.request_id] = result
                    if len(results) == len(wanted):
                        return results
    finally:
        await producer.stop()
        await consumer.stop()
    raise AssertionError("the consumer stopped")


async def test_a_relay_worker_answers_through_the_upstream(stack: Stack, relay_worker: Service) -> None:
    job = relay_job("relay-light", "relay this, please", max_tokens=5, temperature=0.0)
    result = (await run_on_relay(stack, [job]))[job.request_id]
    assert result.ok, result.error
    assert (result.model, result.pool) == ("relay-light", "relay")
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens == 5
    assert result.choices[0].finish_reason == "length"
    async with httpx.AsyncClient(timeout=60, headers=stack.auth_headers) as client:
        answer = await client.post(
            f"{stack.gateway_url}/v1/chat/completions",
            json={"model": "tiny-light", "messages": [{"role": "user", "content": "relay this, please"}],
                  "max_tokens": 5, "temperature": 0},
        )  # fmt: skip
    direct = answer.json()
    assert result.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert result.usage.prompt_tokens == direct["usage"]["prompt_tokens"]


async def test_a_relay_worker_answers_a_refusal_and_retries_an_unreachable_upstream(
    stack: Stack, relay_worker: Service
) -> None:
    ok = relay_job("relay-light", "fine", max_tokens=2)
    missing = relay_job("relay-missing", "nobody serves this")
    down = relay_job("relay-down", "nobody listens")
    results = await run_on_relay(stack, [ok, missing, down])
    assert results[ok.request_id].ok and results[ok.request_id].usage.completion_tokens == 2
    refused = results[missing.request_id].error
    assert refused is not None and refused.message == "The model 'no-such-model' does not exist"
    exhausted = results[down.request_id].error
    assert exhausted is not None and exhausted.code == "retries_exhausted"
    assert "after 3 attempts: TransientBackendError" in exhausted.message and "unreachable" in exhausted.message
    assert "relay-down" in exhausted.message and "127.0.0.1" not in exhausted.message  # no internal address
