"""The live model registry on the real stack: workers' cards, `/v1/models`, tombstones and expiry.

Tests that stop a worker restart it with the stack's own environment before they end, and wait
until it serves again, so the stack is ready for whatever test runs next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from faststream.kafka import KafkaBroker

from shared import topics
from shared.messages import ModelCard, utcnow
from shared.registry import RegistryView
from tests.e2e.harness import Service, Stack

Snapshot = dict[str, ModelCard | None]
"""Latest record per key on the registry topic: a card, or None for a tombstone."""

SHORT_REGISTRY = {"AUTOGLM_WORKER__REGISTRY__HEARTBEAT_S": "1", "AUTOGLM_WORKER__REGISTRY__TTL_S": "5"}


async def registry_snapshot(stack: Stack) -> Snapshot:
    """Read the whole registry partition, as any consumer would, and keep the latest record per key."""
    partition = TopicPartition(topics.REGISTRY, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.infra.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        latest: Snapshot = {}
        async with asyncio.timeout(30):
            while await consumer.position(partition) < end:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for record in batch.get(partition, []):
                    card = ModelCard.model_validate_json(record.value) if record.value else None
                    latest[record.key.decode()] = card
        return latest
    finally:
        await consumer.stop()


def live(snapshot: Snapshot, now: datetime | None = None) -> list[ModelCard]:
    """Serving cards whose heartbeat is within their ttl."""
    now = now or utcnow()
    return [
        card
        for card in snapshot.values()
        if card is not None and card.status == "serving" and card.heartbeat_at + timedelta(seconds=card.ttl_s) > now
    ]


def card_of(cards: list[ModelCard], service: Service) -> ModelCard:
    """The one card published by `service`'s current process (its pid is in the instance id)."""
    assert service.process is not None
    mine = [card for card in cards if f"-{service.process.pid}-" in card.instance_id]
    assert len(mine) == 1, f"{service.name} (pid {service.process.pid}) has {len(mine)} live cards: {cards}"
    return mine[0]


def worker(stack: Stack, pool: str) -> Service:
    return next(service for service in stack.services if service.name == f"worker-{pool}")


async def listed(stack: Stack) -> dict[str, dict[str, Any]]:
    """`GET /v1/models` as a client sees it, by id."""
    async with httpx.AsyncClient(timeout=10, headers=stack.auth_headers) as client:
        response = await client.get(f"{stack.gateway_url}/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    return {entry["id"]: entry for entry in body["data"]}


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str, limit_s: float) -> float:
    """Poll `condition` until it is true; returns the seconds it took."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < limit_s, f"not within {limit_s} s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def restart(stack: Stack, service: Service, extra_env: dict[str, str] | None = None) -> ModelCard:
    """Stop `service` if it still runs, start it (with `extra_env`), wait until it serves and is registered."""
    await asyncio.to_thread(service.stop)
    service.start({**stack.env, **(extra_env or {})})
    await asyncio.to_thread(stack.wait_ready)
    assert service.process is not None
    pid = f"-{service.process.pid}-"

    async def registered() -> bool:
        return any(pid in card.instance_id for card in live(await registry_snapshot(stack)))

    await wait_until(registered, f"{service.name} registered", 30)
    return card_of(live(await registry_snapshot(stack)), service)


async def model_listed(stack: Stack, model_id: str) -> bool:
    return model_id in await listed(stack)


async def model_gone(stack: Stack, model_id: str) -> bool:
    return model_id not in await listed(stack)


async def restore_heavy(stack: Stack) -> None:
    """The heavy worker runs with the stack's settings, is listed and answers (the stack is as it was)."""
    heavy = worker(stack, "heavy")
    if heavy.process is None or heavy.process.poll() is not None:
        await restart(stack, heavy)
    await wait_until(lambda: model_listed(stack, "tiny-heavy"), "tiny-heavy listed again", 30)
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0, timeout=90)
    completion = await asyncio.to_thread(
        lambda: client.chat.completions.create(
            model="tiny-heavy", messages=[{"role": "user", "content": "back?"}], max_tokens=2
        )
    )
    assert completion.model == "tiny-heavy"


@pytest.fixture
async def heavy_restored(stack: Stack) -> AsyncIterator[None]:
    """Whatever the test did to the heavy worker, it serves again afterwards."""
    yield
    await restore_heavy(stack)


async def test_every_worker_publishes_a_live_card_per_model(stack: Stack) -> None:
    cards = live(await registry_snapshot(stack))
    light, heavy = card_of(cards, worker(stack, "light")), card_of(cards, worker(stack, "heavy"))
    assert (light.model_id, light.pool, heavy.model_id, heavy.pool) == ("tiny-light", "light", "tiny-heavy", "heavy")
    for card in (light, heavy):
        assert card.backend == "torch" and card.framework.startswith("transformers-")
        assert (card.device, card.precision) in {("cpu", "fp32"), ("cuda", "fp16")}
        assert card.ttl_s == 30 and card.status == "serving" and card.schema_version == 1
        assert card.started_at <= card.heartbeat_at <= utcnow() + timedelta(seconds=1)
        assert [spec.name for spec in card.inputs] == ["messages"]
        assert [spec.name for spec in card.outputs] == ["choices"]
    # batch sizes and contexts from the deployment file: light 32 / 512, heavy 16 / 1024
    assert (light.max_batch_size, light.max_context_tokens) == (32, 512)
    assert (heavy.max_batch_size, heavy.max_context_tokens) == (16, 1024)


async def test_a_view_replayed_at_start_holds_every_live_card_once_replay_returns(stack: Stack) -> None:
    broker = KafkaBroker(stack.infra.kafka_bootstrap)
    view = RegistryView(replaying=True)  # as a starting router reads it
    view.subscribe(broker)
    await broker.start()
    try:
        assert await view.replay(stack.infra.kafka_bootstrap)
        replayed = {card.key for card in view.live_models()}
    finally:
        await broker.stop()
    assert not view.replaying
    expected = {card.key for card in live(await registry_snapshot(stack))}
    assert replayed == expected and len(expected) >= 2  # light and heavy, at least


async def test_models_endpoint_lists_the_live_models(stack: Stack) -> None:
    cards = live(await registry_snapshot(stack))
    heavy_card = card_of(cards, worker(stack, "heavy"))
    models = await listed(stack)
    assert {"auto", "light", "heavy", "tiny-light", "tiny-heavy"} <= set(models)
    tiny_heavy = models["tiny-heavy"]
    assert tiny_heavy["object"] == "model" and tiny_heavy["owned_by"] == "autoglm"
    assert tiny_heavy["pool"] == "heavy" and tiny_heavy["backend"] == "torch" and tiny_heavy["instances"] == 1
    assert (tiny_heavy["precision"], tiny_heavy["device"]) == (heavy_card.precision, heavy_card.device)
    assert tiny_heavy["created"] == int(heavy_card.started_at.timestamp())
    assert models["light"]["instances"] == 1 and "precision" not in models["auto"]

    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=stack.api_key, max_retries=0, timeout=30)
    retrieved = await asyncio.to_thread(client.models.retrieve, "tiny-light")
    assert retrieved.id == "tiny-light" and retrieved.owned_by == "autoglm"
    with pytest.raises(openai.NotFoundError) as raised:
        await asyncio.to_thread(client.models.retrieve, "gpt-17")
    assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.usefixtures("heavy_restored")
async def test_a_worker_stopped_with_sigterm_leaves_the_registry_at_once(stack: Stack) -> None:
    heavy = worker(stack, "heavy")
    key = card_of(live(await registry_snapshot(stack)), heavy).key

    assert await asyncio.to_thread(heavy.stop) in (0, -15)
    assert (await registry_snapshot(stack))[key] is None  # a tombstone is the key's latest record
    # far sooner than the 30 s ttl: the tombstone did it, not expiry
    await wait_until(lambda: model_gone(stack, "tiny-heavy"), "tiny-heavy dropped from /v1/models", 5)

    models = await listed(stack)
    assert "heavy" not in models and {"auto", "light", "tiny-light"} <= set(models)
    async with httpx.AsyncClient(timeout=10, headers=stack.auth_headers) as client:
        not_found = await client.get(f"{stack.gateway_url}/v1/models/tiny-heavy")
    assert not_found.status_code == 404 and not_found.json()["error"]["code"] == "model_not_found"


@pytest.mark.usefixtures("heavy_restored")
async def test_a_killed_worker_expires_after_its_ttl(stack: Stack) -> None:
    heavy = worker(stack, "heavy")
    try:
        card = await restart(stack, heavy, SHORT_REGISTRY)  # only this process gets the short ttl
        assert card.ttl_s == 5
        await wait_until(lambda: model_listed(stack, "tiny-heavy"), "restarted heavy listed", 10)

        assert heavy.process is not None
        heavy.process.kill()  # no shutdown hook runs: no tombstone, the heartbeats just stop
        await asyncio.to_thread(heavy.process.wait)
        last = (await registry_snapshot(stack))[card.key]
        assert last is not None, "a SIGKILLed worker cannot have withdrawn its card"
        expires_at = last.heartbeat_at + timedelta(seconds=last.ttl_s)
        if utcnow() < expires_at - timedelta(seconds=1):
            assert "tiny-heavy" in await listed(stack)  # still within its ttl: nothing told the gateway yet

        await wait_until(lambda: model_gone(stack, "tiny-heavy"), "killed worker's card expired", 15)
        gone_at = utcnow()
        assert expires_at <= gone_at <= expires_at + timedelta(seconds=5)
    finally:
        await restart(stack, heavy)  # with the stack's settings again
