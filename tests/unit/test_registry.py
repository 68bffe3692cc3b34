"""Registry view logic with an injected clock: latest card per key, tombstones, expiry after the ttl."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import ConsumerRecord
from pydantic import ValidationError

from services.gateway.models import find_model, list_models
from services.router.config import RouterSettings
from services.router.handlers import PoolState
from services.router.load import PoolLoad
from services.worker.app import model_card
from services.worker.backends.base import BackendInfo
from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel
from shared.messages import ModelCard
from shared.registry import RegistryOptions, RegistryView
from shared.settings import CommonSettings

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def card(model_id: str = "tiny-light", pool: str = "light", instance: str = "host-1-aa", **fields: object) -> ModelCard:
    values: dict[str, object] = {
        "model_id": model_id, "pool": pool, "backend": "torch", "framework": "transformers-4", "precision": "float32",
        "device": "cpu", "max_batch_size": 32, "max_context_tokens": 512, "instance_id": instance,
        "started_at": T0, "heartbeat_at": T0, "ttl_s": 30.0,
    }  # fmt: skip
    return ModelCard.model_validate({**values, **fields})


def record(key: bytes | None, value: bytes | None, offset: int = 0) -> ConsumerRecord:
    return ConsumerRecord(
        topic="autoglm.registry", partition=0, offset=offset, timestamp=0, timestamp_type=0, key=key, value=value,
        checksum=None, serialized_key_size=0, serialized_value_size=0, headers=[],
    )  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def view(clock: FakeClock) -> RegistryView:
    return RegistryView(clock=clock)


def live_ids(view: RegistryView) -> list[str]:
    return [c.model_id for c in view.live_models()]


def test_a_card_lives_until_its_ttl_after_the_heartbeat(view: RegistryView, clock: FakeClock) -> None:
    light = card()
    view.apply(light.key, light)
    clock.advance(29.9)
    assert live_ids(view) == ["tiny-light"] and view.is_pool_live("light")
    clock.advance(0.1)
    assert live_ids(view) == [] and not view.is_pool_live("light") and view.cards() == []


def test_a_renewed_heartbeat_keeps_the_card_alive(view: RegistryView, clock: FakeClock) -> None:
    for _ in range(5):  # one renewal every 10 s, 50 s in all
        clock.advance(10)
        renewed = card(heartbeat_at=clock.now)
        view.apply(renewed.key, renewed)
    clock.advance(29)
    assert live_ids(view) == ["tiny-light"]
    clock.advance(1)
    assert live_ids(view) == []


def test_a_tombstone_removes_the_card_at_once(view: RegistryView) -> None:
    light, heavy = card(), card("tiny-heavy", "heavy", instance="host-2-bb")
    view.apply(light.key, light)
    view.apply(heavy.key, heavy)
    view.apply(heavy.key, None)
    view.apply("never/seen", None)  # harmless
    assert live_ids(view) == ["tiny-light"] and view.live_pools() == {"light"}


def test_a_stale_card_replayed_from_the_log_is_never_live(view: RegistryView, clock: FakeClock) -> None:
    clock.advance(3600)  # a worker killed an hour ago left this card in the compacted topic
    old = card()
    view.apply(old.key, old)
    assert view.cards() == []


def test_a_heartbeat_from_a_clock_running_ahead_counts_from_its_arrival(view: RegistryView, clock: FakeClock) -> None:
    ahead = card(heartbeat_at=T0 + timedelta(hours=1))
    view.apply(ahead.key, ahead)
    clock.advance(29)
    assert live_ids(view) == ["tiny-light"]
    clock.advance(1)
    assert live_ids(view) == []


def test_draining_cards_are_known_but_not_live(view: RegistryView) -> None:
    draining = card(status="draining")
    view.apply(draining.key, draining)
    assert [c.status for c in view.cards()] == ["draining"]
    assert view.live_models() == [] and not view.is_pool_live("light")


def test_pools_are_live_while_any_of_their_workers_is(view: RegistryView, clock: FakeClock) -> None:
    first, second = card(instance="host-1-aa"), card(instance="host-2-bb", heartbeat_at=T0 + timedelta(seconds=20))
    clock.advance(20)
    view.apply(first.key, first)
    view.apply(second.key, second)
    assert len(view.live_models()) == 2
    clock.advance(15)  # first expired (T0 + 30), second lives until T0 + 50
    assert [c.instance_id for c in view.live_models()] == ["host-2-bb"] and view.is_pool_live("light")


def test_raw_records_null_or_empty_values_are_tombstones(view: RegistryView) -> None:
    light, heavy = card(), card("tiny-heavy", "heavy")
    view.apply_record(record(light.key.encode(), light.model_dump_json().encode()))
    view.apply_record(record(heavy.key.encode(), heavy.model_dump_json().encode()))
    assert sorted(live_ids(view)) == ["tiny-heavy", "tiny-light"]
    view.apply_record(record(light.key.encode(), None))
    view.apply_record(record(heavy.key.encode(), b""))
    assert view.cards() == []


def test_invalid_or_keyless_records_are_skipped(view: RegistryView) -> None:
    light = card()
    view.apply_record(record(b"x/y", b"{not json"))
    view.apply_record(record(b"x/y", b'{"model_id": "no other field"}'))
    view.apply_record(record(None, light.model_dump_json().encode()))
    assert view.cards() == []


def test_unknown_fields_from_newer_workers_are_ignored() -> None:
    body = card().model_dump() | {"gpu_memory_mb": 80_000}
    assert ModelCard.model_validate(body).model_id == "tiny-light"


def test_ttl_must_outlive_the_heartbeat() -> None:
    with pytest.raises(ValidationError, match="ttl_s"):
        RegistryOptions(heartbeat_s=10, ttl_s=10)
    assert RegistryOptions().ttl_s == 30 and RegistryOptions().heartbeat_s == 10


# --------------------------------------------------------------------- gateway listing


def test_models_come_from_the_config_until_a_card_is_live(
    router_settings: CommonSettings, view: RegistryView, clock: FakeClock
) -> None:
    configured = list_models(router_settings, view)
    assert [m.id for m in configured] == ["auto", "light", "heavy", "tiny-light", "tiny-heavy"]
    assert all(m.precision is None and m.instances is None for m in configured)  # only workers know these

    heavy = card("tiny-heavy", "heavy", precision="float16", device="cuda:0", max_context_tokens=1024)
    view.apply(heavy.key, heavy)
    live = {m.id: m for m in list_models(router_settings, view)}
    assert list(live) == ["auto", "heavy", "tiny-heavy"]
    assert live["tiny-heavy"].pool == "heavy" and live["tiny-heavy"].precision == "float16"
    assert live["tiny-heavy"].instances == 1 and live["tiny-heavy"].created == int(T0.timestamp())
    assert find_model(router_settings, view, "light") is None

    clock.advance(30)  # the card expired: back to the configuration
    assert [m.id for m in list_models(router_settings, view)] == [m.id for m in configured]


def test_replicas_of_a_model_are_one_entry(router_settings: CommonSettings, view: RegistryView) -> None:
    for instance in ("host-1-aa", "host-2-bb"):
        replica = card(instance=instance)
        view.apply(replica.key, replica)
    entries = [m for m in list_models(router_settings, view) if m.id in ("light", "tiny-light")]
    assert [(m.id, m.instances) for m in entries] == [("light", 2), ("tiny-light", 2)]


# ------------------------------------------------------------------------- worker card


class StubBackend:
    """Only what a card needs from a backend."""

    model_id = "tiny-light"

    def __init__(self, max_batch_size: int | None) -> None:
        self.max_batch_size = max_batch_size

    def info(self) -> BackendInfo:
        return BackendInfo("torch", "transformers-9", "cpu", "float32", max_batch_size=self.max_batch_size)


@pytest.mark.parametrize(("engine_limit", "expected"), [(None, 32), (8, 8), (64, 32)])
def test_a_worker_card_joins_configuration_and_backend_info(engine_limit: int | None, expected: int) -> None:
    settings = WorkerSettings(worker={"pool": "light", "registry": {"heartbeat_s": 1, "ttl_s": 5}})
    config = settings.pool.models[0]
    loaded = LoadedModel(config, StubBackend(engine_limit))  # type: ignore[arg-type]
    made = model_card(settings, loaded, "host-1-aa", T0)
    assert made.key == "host-1-aa/tiny-light" and made.pool == "light" and made.ttl_s == 5
    assert (made.backend, made.framework, made.device, made.precision) == ("torch", "transformers-9", "cpu", "float32")
    assert made.max_batch_size == expected and made.max_context_tokens == 512
    assert [s.name for s in made.inputs] == ["messages"] and [s.name for s in made.outputs] == ["choices"]
    assert made.schema_version == 1 and "request_id" not in made.model_dump()


async def test_a_starting_router_trusts_its_configuration_until_the_registry_is_read(
    router_settings: RouterSettings, clock: FakeClock
) -> None:
    registry = RegistryView(clock=clock, replaying=True)
    light = card()
    registry.apply_record(record(light.key.encode(), light.model_dump_json().encode(), offset=0))
    state = PoolState(router_settings, registry, PoolLoad(router_settings))

    view = await state.view()  # heavy's card may be the next record: its absence says nothing yet
    assert view.live_pools is None and state.breakers["heavy"].state == "closed"
    assert registry.read_up_to == 1

    registry.replaying = False  # read to the end: heavy really has no card
    view = await state.view()
    assert view.live_pools == {"light"} and state.breakers["heavy"].state == "open"


async def test_a_replay_that_cannot_reach_kafka_gives_up_and_uses_the_view_as_it_is() -> None:
    registry = RegistryView(replaying=True)
    assert not await registry.replay("127.0.0.1:9", timeout_s=5)  # nothing listens on port 9
    assert not registry.replaying
