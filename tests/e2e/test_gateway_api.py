"""The gateway as the official OpenAI SDK sees it: streaming, text completions, the cache, two gateways."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.harness import PORT_BASE, Stack
from tests.e2e.test_pipeline import fetch_row

QUESTION = [{"role": "user", "content": "Tell me about the lighthouse"}]
NO_CACHE = {"Cache-Control": "no-cache"}


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0, timeout=90)


@pytest.fixture
def async_client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0, timeout=90)


def test_a_stream_arrives_in_pieces_that_join_to_the_stored_answer(client: openai.OpenAI, stack: Stack) -> None:
    stream = client.chat.completions.create(
        model="tiny-light", messages=QUESTION, max_tokens=32, temperature=0.7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) >= 2, "the answer came in one piece: it was not streamed"
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 0 < usage.completion_tokens <= 32
    stored = asyncio.run(fetch_row(stack, "results", chunks[0].id))
    # the random tiny model may emit U+0000, which PostgreSQL cannot hold: the exporter stores U+FFFD
    assert stored["content"] == "".join(pieces).replace("\x00", "\ufffd")
    assert stored["completion_tokens"] == usage.completion_tokens


def test_a_greedy_stream_says_what_the_plain_answer_says(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="tiny-heavy", messages=QUESTION, max_tokens=20, temperature=0, extra_headers=NO_CACHE
    )
    stream = client.chat.completions.create(
        model="tiny-heavy", messages=QUESTION, max_tokens=20, temperature=0, stream=True, extra_headers=NO_CACHE
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == plain.choices[0].message.content


async def test_the_async_client_streams_and_completes(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    pieces = [
        chunk.choices[0].delta.content async for chunk in stream if chunk.choices and chunk.choices[0].delta.content
    ]
    plain = await async_client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert pieces and plain.choices[0].message.content is not None


def test_a_stream_that_cannot_start_is_a_plain_http_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny-light", messages=[{"role": "user", "content": "word " * 3000}], max_tokens=8, stream=True
        )
    assert refused.value.code == "context_length_exceeded"


def test_stream_options_without_a_stream_is_a_400(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json={"messages": QUESTION, "stream_options": {"include_usage": True}},
        headers=stack.auth_headers,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options"


def test_text_completions_continue_the_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="tiny-light", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].text and completion.choices[0].finish_reason in ("stop", "length")
    as_chat = client.chat.completions.create(
        model="tiny-light", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=1
    )
    assert completion.usage and as_chat.usage
    assert completion.usage.prompt_tokens < as_chat.usage.prompt_tokens  # no chat template around the prompt
    stream = client.completions.create(
        model="tiny-light", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True,
        extra_headers=NO_CACHE,
    )  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == completion.choices[0].text


def test_an_unsupported_completions_field_is_a_400_naming_it(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/completions", json={"prompt": "hi", "logprobs": 2}, headers=stack.auth_headers
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logprobs"


def metric(gateway_url: str, sample: str) -> float:
    """One sample of a gateway's /metrics, e.g. `autoglm_gateway_replies_total{outcome="unclaimed"}` (0 if absent)."""
    metrics = httpx.get(f"{gateway_url}/metrics", follow_redirects=True).text
    values = [line.split()[-1] for line in metrics.splitlines() if line.startswith(sample + " ")]
    return float(values[0]) if values else 0.0


CACHE_HITS = 'autoglm_gateway_cache_lookups_total{outcome="hit"}'


def test_a_deterministic_request_is_answered_from_the_cache(client: openai.OpenAI, stack: Stack) -> None:
    question = [{"role": "user", "content": f"cache me {time.time()}"}]
    first = client.chat.completions.with_raw_response.create(model="tiny-light", messages=question, temperature=0)
    hits_before = metric(stack.gateway_url, CACHE_HITS)
    second = client.chat.completions.with_raw_response.create(model="tiny-light", messages=question, temperature=0)
    bypassed = client.chat.completions.with_raw_response.create(
        model="tiny-light", messages=question, temperature=0, extra_headers=NO_CACHE
    )
    sampled = client.chat.completions.with_raw_response.create(model="tiny-light", messages=question, temperature=1)
    assert first.headers["x-autoglm-cache"] == "miss" and second.headers["x-autoglm-cache"] == "hit"
    assert second.parse().id == first.parse().id  # the stored request that produced it
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert bypassed.headers["x-autoglm-cache"] == "bypass" and bypassed.parse().id != first.parse().id
    assert sampled.headers["x-autoglm-cache"] == "off"
    assert metric(stack.gateway_url, CACHE_HITS) == hits_before + 1
    assert 0 < metric(stack.gateway_url, "autoglm_gateway_cache_hit_ratio") <= 1


@pytest.fixture
def second_gateway(stack: Stack) -> Iterator[str]:
    """Another gateway instance (reply partition 1) on its own port, against the same Kafka."""
    with stack.extra_gateway("gateway-1", PORT_BASE + 50, instance=1) as gateway:
        yield f"http://127.0.0.1:{gateway.port}"


UNCLAIMED = 'autoglm_gateway_replies_total{outcome="unclaimed"}'
DELIVERED = 'autoglm_gateway_replies_total{outcome="delivered"}'


async def test_two_gateways_each_get_exactly_their_own_replies(stack: Stack, second_gateway: str) -> None:
    gateways = [stack.gateway_url, second_gateway]
    unclaimed_before = [metric(url, UNCLAIMED) for url in gateways]
    delivered_before = [metric(url, DELIVERED) for url in gateways]

    async def ask(url: str, n: int) -> tuple[str, str]:
        async with httpx.AsyncClient(timeout=90, headers=stack.auth_headers) as http:
            response = await http.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "auto",
                    "messages": [{"role": "user", "content": f"gateway question {n}"}],
                    "max_tokens": 4,
                },
            )
        assert response.status_code == 200, response.text
        return url, response.json()["id"]

    answers = await asyncio.gather(*(ask(gateways[n % 2], n) for n in range(24)))
    assert len({request_id for _, request_id in answers}) == 24
    for url in gateways:
        assert sum(1 for answered_by, _ in answers if answered_by == url) == 12
    # Neither read a reply meant for the other (each reads only its own partition).
    assert [metric(url, UNCLAIMED) for url in gateways] == unclaimed_before
    assert all(metric(url, DELIVERED) >= before + 12 for url, before in zip(gateways, delivered_before, strict=True))


def test_cancelling_a_running_stream_stops_it(client: openai.OpenAI, stack: Stack) -> None:
    stream = client.chat.completions.create(
        model="tiny-heavy", messages=[{"role": "user", "content": "go on"}], max_tokens=900, temperature=0.9,
        stream=True,
    )  # fmt: skip
    received = ""
    with pytest.raises(openai.APIError, match="cancelled"):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not received:
                received = chunk.choices[0].delta.content
                response = httpx.post(f"{stack.gateway_url}/v1/requests/{chunk.id}/cancel", headers=stack.auth_headers)
                assert response.status_code == 202, response.text
    stored = asyncio.run(fetch_row(stack, "results", chunk.id))
    assert stored["error_code"] == "request_cancelled"
