"""Registry publisher and view on FastStream's in-memory broker: cards, heartbeats, tombstones."""

from __future__ import annotations

import asyncio
from typing import Annotated

from aiokafka import ConsumerRecord
from faststream import Context
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from prometheus_client import CollectorRegistry

from services.router.config import RouterSettings
from shared import topics
from shared.kafka import make_broker
from shared.messages import ModelCard, utcnow
from shared.registry import RegistryPublisher, RegistryView


def card(model_id: str, pool: str, instance: str = "host-1-aa") -> ModelCard:
    return ModelCard(
        model_id=model_id, pool=pool, backend="torch", framework="transformers-4", precision="float32",
        device="cpu", max_batch_size=32, max_context_tokens=512, instance_id=instance, started_at=utcnow(),
    )  # fmt: skip


def broker_with_view(router_settings: RouterSettings) -> tuple[KafkaBroker, RegistryView]:
    broker = make_broker(router_settings, service="test", registry=CollectorRegistry())
    view = RegistryView()
    view.subscribe(broker)
    return broker, view


async def test_published_cards_are_live_and_tombstones_withdraw_them(router_settings: RouterSettings) -> None:
    broker, view = broker_with_view(router_settings)
    published: list[tuple[bytes | None, bytes | None]] = []

    @broker.subscriber(topics.REGISTRY, group_id="spy")
    async def spy(message: KafkaMessage) -> None:
        record: ConsumerRecord = message.raw_message
        published.append((record.key, record.value))

    async with TestKafkaBroker(broker):
        publisher = RegistryPublisher(broker, [card("tiny-light", "light"), card("tiny-heavy", "heavy")], 0.05)
        await publisher.start()
        assert sorted(c.model_id for c in view.live_models()) == ["tiny-heavy", "tiny-light"]
        first_beat = {c.key: c.heartbeat_at for c in view.live_models()}
        await asyncio.sleep(0.2)  # a few heartbeats
        assert all(c.heartbeat_at > first_beat[c.key] for c in view.live_models())
        await publisher.stop()
        assert view.live_models() == [] and view.live_pools() == set()

    tombstones = [key for key, value in published if key is not None and value is None]
    assert sorted(tombstones) == [b"host-1-aa/tiny-heavy", b"host-1-aa/tiny-light"]  # real nulls, not b""


async def test_a_handler_can_take_the_view_from_the_context(router_settings: RouterSettings) -> None:
    broker, view = broker_with_view(router_settings)
    seen: list[RegistryView] = []

    @broker.subscriber(topics.REQUESTS, group_id="spy")
    async def handler(body: str, registry: Annotated[RegistryView, Context("registry")]) -> None:
        seen.append(registry)

    async with TestKafkaBroker(broker):
        await broker.publish("hi", topics.REQUESTS)
    assert seen == [view]
