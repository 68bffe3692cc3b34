"""OpenAIBackend against a scripted OpenAI-compatible server (real HTTP on localhost): what is sent,
how answers, refusals, server failures, timeouts and streams come back.

The server's behaviour is chosen by the last message of each request, e.g. "status:503" or "sleep:2".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from services.worker.backends import load_backend
from services.worker.backends.base import (
    GenerationInput,
    PermanentBackendError,
    TransientBackendError,
)
from services.worker.backends.openai_backend import OpenAIBackend
from shared.messages import ChatMessage
from shared.settings import ModelConfig, PoolConfig
from tests.local_server import LocalServer

STREAMED_TEXT = "Hello, wörld — 你好! "  # multi-byte characters split over several chunks


def completion(content: str, *, finish_reason: str = "stop", usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": "scripted",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"


async def sse_events(script: str) -> AsyncIterator[str]:
    yield chunk({"role": "assistant"})
    yield ": keep-alive comment\n\n"
    for start in range(0, len(STREAMED_TEXT), 3):
        yield chunk({"content": STREAMED_TEXT[start : start + 3]})
        await asyncio.sleep(0)
        if script == "stream-break" and start == 0:
            yield 'data: {"error": {"message": "engine died", "code": 500}}\n\n'
            return
    yield chunk({}, finish_reason="stop")
    yield 'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}\n\n'
    yield "data: [DONE]\n\n"


class Upstream:
    """The scripted server's app and what it received."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        script: str = body["messages"][-1]["content"]
        if script.startswith("status:"):
            code = int(script.removeprefix("status:"))
            return JSONResponse({"error": {"message": f"scripted {code}", "type": "x"}}, status_code=code)
        if script == "tgi-refusal":
            return JSONResponse({"error": "Input validation error: too long", "error_type": "validation"}, 422)
        if script == "not-json":
            return PlainTextResponse("<html>captive portal</html>")
        if script.startswith("sleep:"):
            await asyncio.sleep(float(script.removeprefix("sleep:")))
        if body.get("stream"):
            return StreamingResponse(sse_events(script), media_type="text/event-stream")
        if script == "no-usage":
            return JSONResponse(completion("bare"))
        finish = "length" if body["max_tokens"] <= 2 else "stop"
        usage = {"prompt_tokens": len(script.split()), "completion_tokens": min(body["max_tokens"], 5)}
        return JSONResponse(completion(f"echo: {script}", finish_reason=finish, usage=usage))


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    scripted = Upstream()
    with LocalServer(scripted.app) as server:
        yield scripted, f"{server.url}/v1"


@pytest.fixture
async def backend(upstream: tuple[Upstream, str]) -> AsyncIterator[OpenAIBackend]:
    model = ModelConfig(id="relay", endpoint=upstream[1], upstream_model="scripted-model", timeout_s=5)
    loaded = OpenAIBackend.from_config(model, max_connections=8)
    yield loaded
    await loaded.aclose()


def ask(request_id: str, content: str, **options: Any) -> GenerationInput:
    return GenerationInput(request_id, [ChatMessage(role="user", content=content)], **{"max_tokens": 16, **options})


# -------------------------------------------------------------------------------------------- requests


async def test_every_field_is_sent_to_the_upstream_model(
    backend: OpenAIBackend, upstream: tuple[Upstream, str]
) -> None:
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="fields")]
    request = GenerationInput("r1", messages, max_tokens=7, temperature=0.3, top_p=0.9, stop=["\n", "END"], seed=42)
    await backend.agenerate([request])
    assert upstream[0].bodies[-1] == {
        "model": "scripted-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fields"}],
        "max_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["\n", "END"],
        "seed": 42,
    }


async def test_unset_stop_and_seed_are_left_out(backend: OpenAIBackend, upstream: tuple[Upstream, str]) -> None:
    await backend.agenerate([ask("r1", "plain")])
    assert "stop" not in upstream[0].bodies[-1] and "seed" not in upstream[0].bodies[-1]


async def test_the_api_key_comes_from_the_named_env_var(
    upstream: tuple[Upstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_TEST_KEY", "sk-test-123")
    model = ModelConfig(id="relay", endpoint=upstream[1], api_key_env="RELAY_TEST_KEY")
    keyed = OpenAIBackend.from_config(model, max_connections=1)
    try:
        await keyed.agenerate([ask("r1", "with key")])
    finally:
        await keyed.aclose()
    assert upstream[0].headers[-1]["authorization"] == "Bearer sk-test-123"
    assert upstream[0].bodies[-1]["model"] == "relay"  # upstream_model defaults to the model id
    assert "sk-test-123" not in repr(keyed.info())


async def test_no_api_key_env_sends_no_authorization(backend: OpenAIBackend, upstream: tuple[Upstream, str]) -> None:
    await backend.agenerate([ask("r1", "anonymous")])
    assert "authorization" not in upstream[0].headers[-1]


def test_an_api_key_env_that_is_not_set_stops_the_worker_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_MISSING_KEY", raising=False)
    model = ModelConfig(id="relay", endpoint="http://127.0.0.1:9/v1", api_key_env="RELAY_MISSING_KEY")
    with pytest.raises(ValueError, match="RELAY_MISSING_KEY"):
        OpenAIBackend.from_config(model, max_connections=1)


def test_load_backend_builds_it_for_an_openai_pool() -> None:
    model = ModelConfig(id="relay", endpoint="http://127.0.0.1:9/v1/")
    pool = PoolConfig(backend="openai", models=[model], batching={"max_batch_size": 12})
    loaded = load_backend(model, pool, None)
    assert isinstance(loaded, OpenAIBackend)
    assert loaded.max_connections == 12  # a full batch's calls all run at once
    info = loaded.info()
    assert (info.backend, info.device, info.precision) == ("openai", "remote", "upstream")
    assert "127.0.0.1" not in repr(info)  # the registry shows it to API clients: no internal addresses
    loaded.close()


# ------------------------------------------------------------------------------------------- answers


async def test_answers_come_back_in_input_order_whatever_order_they_finish_in(backend: OpenAIBackend) -> None:
    batch = [ask("slow", "sleep:0.3"), ask("fast", "quick one"), ask("cut", "short", max_tokens=2)]
    outputs = await backend.agenerate(batch)
    assert [output.request_id for output in outputs] == ["slow", "fast", "cut"]
    assert [output.text for output in outputs] == ["echo: sleep:0.3", "echo: quick one", "echo: short"]
    assert [(output.prompt_tokens, output.completion_tokens) for output in outputs] == [(1, 5), (2, 5), (1, 2)]
    assert [output.finish_reason for output in outputs] == ["stop", "stop", "length"]
    assert all(output.error is None for output in outputs)


async def test_the_batch_runs_concurrently(backend: OpenAIBackend) -> None:
    started = time.perf_counter()
    await backend.agenerate([ask(str(index), "sleep:0.5") for index in range(6)])
    assert time.perf_counter() - started < 1.5  # one after another would take 3 s


async def test_a_server_without_usage_counts_zero_tokens(backend: OpenAIBackend) -> None:
    [output] = await backend.agenerate([ask("r1", "no-usage")])
    assert (output.text, output.prompt_tokens, output.completion_tokens) == ("bare", 0, 0)


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_a_refused_request_is_an_error_output_and_its_companions_are_answered(
    backend: OpenAIBackend, status: int
) -> None:
    outputs = await backend.agenerate([ask("a", "fine"), ask("b", f"status:{status}"), ask("c", "also fine")])
    assert [output.finish_reason for output in outputs] == ["stop", "error", "stop"]
    assert outputs[1].error == f"scripted {status}" and outputs[1].text == ""
    assert outputs[0].text == "echo: fine" and outputs[2].text == "echo: also fine"


async def test_a_refusal_in_tgi_dialect_keeps_its_message(backend: OpenAIBackend) -> None:
    [output] = await backend.agenerate([ask("r1", "tgi-refusal")])
    assert output.error == "Input validation error: too long"


# ------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("status", [401, 429, 500, 503])
async def test_a_server_failure_on_one_request_fails_the_batch_for_a_retry(backend: OpenAIBackend, status: int) -> None:
    with pytest.raises(TransientBackendError, match=f"1 of 3 calls failed.*HTTP {status}: scripted {status}"):
        await backend.agenerate([ask("a", "fine"), ask("b", f"status:{status}"), ask("c", "fine")])


async def test_an_unreadable_answer_is_a_server_failure(backend: OpenAIBackend) -> None:
    with pytest.raises(TransientBackendError, match="no readable completion"):
        await backend.agenerate([ask("r1", "not-json")])


async def test_a_call_slower_than_timeout_s_fails_the_batch_without_waiting_for_it(
    upstream: tuple[Upstream, str],
) -> None:
    impatient = OpenAIBackend.from_config(
        ModelConfig(id="relay", endpoint=upstream[1], timeout_s=0.3), max_connections=2
    )
    started = time.perf_counter()
    try:
        with pytest.raises(TransientBackendError, match=r"within 0\.3 s"):
            await impatient.agenerate([ask("r1", "sleep:3"), ask("r2", "fine")])
    finally:
        await impatient.aclose()
    assert time.perf_counter() - started < 2


async def test_a_failure_stops_the_calls_still_running(backend: OpenAIBackend) -> None:
    started = time.perf_counter()
    with pytest.raises(TransientBackendError):
        await backend.agenerate([ask("slow", "sleep:4"), ask("broken", "status:502")])
    assert time.perf_counter() - started < 2


async def test_a_closed_backend_refuses_to_run(upstream: tuple[Upstream, str]) -> None:
    loaded = OpenAIBackend.from_config(ModelConfig(id="relay", endpoint=upstream[1]), max_connections=1)
    await loaded.agenerate([ask("r1", "warm the pool")])
    loaded.close()  # the worker's synchronous close, from the running loop
    await asyncio.sleep(0.05)
    assert loaded.client.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        await loaded.agenerate([ask("r2", "too late")])


# ---------------------------------------------------------------------------------------- streaming


async def test_a_stream_yields_the_text_deltas(backend: OpenAIBackend, upstream: tuple[Upstream, str]) -> None:
    deltas = [delta async for delta in backend.astream(ask("r1", "stream please"))]
    assert len(deltas) > 3 and "".join(deltas) == STREAMED_TEXT
    assert upstream[0].bodies[-1]["stream"] is True


@pytest.mark.parametrize(("status", "error"), [(404, PermanentBackendError), (503, TransientBackendError)])
async def test_a_stream_the_server_does_not_start_raises(
    backend: OpenAIBackend, status: int, error: type[Exception]
) -> None:
    with pytest.raises(error, match=f"HTTP {status}: scripted {status}"):
        async for _ in backend.astream(ask("r1", f"status:{status}")):
            pass


async def test_an_error_event_mid_stream_raises_after_the_deltas_so_far(backend: OpenAIBackend) -> None:
    received = []
    with pytest.raises(TransientBackendError, match="engine died"):
        async for delta in backend.astream(ask("r1", "stream-break")):
            received.append(delta)
    assert received == [STREAMED_TEXT[:3]]
