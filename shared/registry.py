"""The live model registry: workers announce their models on `autoglm.registry`, others read it.

A worker publishes one `ModelCard` per loaded model when it starts and again every
`heartbeat_s` (10 s); on a graceful shutdown it publishes a tombstone (same key, null value) per
card, so readers drop it at once and compaction deletes it. A worker that dies without a word
stops heartbeating, and readers drop its cards `ttl_s` (30 s) after the last heartbeat.

Readers (`RegistryView`) consume the single partition from the beginning, without a consumer
group, so each one rebuilds the whole registry from the compacted log when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import aiokafka
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TopicPartition
from faststream.kafka.annotations import KafkaMessage
from pydantic import BaseModel, Field, ValidationError, model_validator

from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS
from shared.messages import ModelCard, TensorSpec, utcnow

logger = logging.getLogger(__name__)

CONTEXT_KEY = "registry"
"""Name of the view in a FastStream broker's context."""

WITHDRAW_TIMEOUT_S = 5.0
"""How long a stopping worker tries to publish its tombstones."""

Clock = Callable[[], datetime]
"""Returns the current UTC time; injected so expiry can be tested without waiting."""

# Every backend today serves a chat LLM: text in, text out. Shapes count messages, not tokens;
# the token budget is `max_context_tokens`.
CHAT_INPUTS = [
    TensorSpec(
        name="messages",
        dtype="chat_message",
        shape=[-1],
        description="The conversation: any number of turns, at most max_context_tokens after the chat template.",
    )
]
CHAT_OUTPUTS = [
    TensorSpec(
        name="choices",
        dtype="chat_message",
        shape=[1],
        description="One assistant message (n=1), at most the request's max_tokens tokens.",
    )
]


class RegistryOptions(BaseModel):
    """How often a worker renews its cards, and how long a card lives without renewal."""

    heartbeat_s: float = Field(default=10.0, gt=0, description="Interval between a worker's card renewals.")
    ttl_s: float = Field(default=30.0, gt=0, description="A card is stale this long after its last renewal.")

    @model_validator(mode="after")
    def _ttl_outlives_heartbeats(self) -> RegistryOptions:
        if self.ttl_s <= self.heartbeat_s:
            raise ValueError(f"ttl_s ({self.ttl_s}) must be longer than heartbeat_s ({self.heartbeat_s})")
        return self


def new_instance_id() -> str:
    """Unique per worker process: host and pid say where it runs, the suffix tells restarts apart."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def encode_key(card: ModelCard) -> bytes:
    """The Kafka key of a card's records (cards and tombstones alike)."""
    return card.key.encode()


class RegistryPublisher:
    """A worker's side: publishes its cards now and every `heartbeat_s`, tombstones them on stop."""

    def __init__(
        self, broker: KafkaBroker, cards: Iterable[ModelCard], heartbeat_s: float = 10.0, clock: Clock = utcnow
    ) -> None:
        self.broker = broker
        self.cards = list(cards)
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Publish every card, then keep renewing them in the background."""
        await self.beat()
        self._task = asyncio.create_task(self._renew_forever(), name="registry-heartbeat")
        logger.info(
            "registered %s (heartbeat %g s, ttl %g s)",
            ", ".join(card.key for card in self.cards),
            self.heartbeat_s,
            self.cards[0].ttl_s if self.cards else 0,
        )

    async def beat(self) -> None:
        """Publish every card with a fresh heartbeat; a failure is logged and the next beat retries."""
        now = self.clock()
        self.cards = [card.model_copy(update={"heartbeat_at": now}) for card in self.cards]
        try:
            await asyncio.gather(
                *(self.broker.publish(card, topics.REGISTRY, key=encode_key(card)) for card in self.cards)
            )
        except Exception:
            logger.exception("publishing registry heartbeat failed; retrying in %g s", self.heartbeat_s)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.beat()

    async def stop(self) -> None:
        """Stop renewing and withdraw every card with a tombstone (call before the broker stops)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT_S):  # Kafka being down must not hold up the shutdown
                await asyncio.gather(
                    *(self.broker.publish(None, topics.REGISTRY, key=encode_key(card)) for card in self.cards)
                )
        except Exception:
            logger.exception("withdrawing registry cards failed; they expire after their ttl")
            return
        logger.info("withdrew %s from the registry", ", ".join(card.key for card in self.cards))


@dataclass(frozen=True)
class Entry:
    """The latest card under one key and when this reader received it."""

    card: ModelCard
    received_at: datetime

    def expires_at(self) -> datetime:
        """`ttl_s` after the heartbeat; a heartbeat stamped in the future (a fast worker clock) is
        counted from when it arrived instead, so a skewed clock cannot keep a dead card alive."""
        return min(self.card.heartbeat_at, self.received_at) + timedelta(seconds=self.card.ttl_s)


class RegistryView:
    """A reader's side: the latest card per key, minus tombstoned and stale ones."""

    def __init__(self, clock: Clock = utcnow, *, replaying: bool = False) -> None:
        self.clock = clock
        self._entries: dict[str, Entry] = {}
        self.replaying = replaying
        """True while the cards already on the registry are still being read (a router starting): until then
        an absent card says nothing. Cleared by `replay`."""
        self.read_up_to = 0  # the offset after the last record taken in
        self.record_read = asyncio.Event()

    def apply(self, key: str, card: ModelCard | None) -> None:
        """Take in one registry record: a card replaces the key's previous one, None removes it."""
        if card is None:
            if self._entries.pop(key, None) is not None:
                logger.info("registry: %s withdrawn", key)
            return
        entry = Entry(card, self.clock())
        if entry.expires_at() <= entry.received_at:  # e.g. a dead worker's last card, replayed at start
            self._entries.pop(key, None)
            return
        if key not in self._entries:
            logger.info("registry: %s registered (%s pool, %s)", key, card.pool, card.status)
        self._entries[key] = entry

    def apply_record(self, record: ConsumerRecord) -> None:
        """Take in a raw registry record; an empty value is a tombstone, a bad one is skipped."""
        self.read_up_to = max(self.read_up_to, record.offset + 1)
        self.record_read.set()
        if record.key is None:
            logger.warning("registry: ignoring a record without a key at offset %d", record.offset)
            return
        key = record.key.decode(errors="backslashreplace")
        if not record.value:  # a null value is Kafka's tombstone; treat an empty one the same
            self.apply(key, None)
            return
        try:
            card = ModelCard.model_validate_json(record.value)
        except ValidationError as error:
            logger.warning("registry: ignoring an invalid card under %s: %s", key, error)
            return
        self.apply(key, card)

    async def replay(self, bootstrap: str, timeout_s: float = 15.0) -> bool:
        """Wait until every record the registry held when called has been taken in, then clear `replaying`.
        False after `timeout_s` (e.g. the newest records were compacted away) or when Kafka cannot say where the
        registry ends: the view is used as it is, and the workers' next heartbeats complete it."""
        try:
            async with asyncio.timeout(timeout_s):
                end = await registry_end_offset(bootstrap)
                while self.read_up_to < end:
                    self.record_read.clear()
                    await self.record_read.wait()
            return True
        except (TimeoutError, KafkaError):
            return False
        finally:
            self.replaying = False

    def cards(self) -> list[ModelCard]:
        """Every card still within its ttl, serving or draining; stale ones are forgotten."""
        now = self.clock()
        for key in [key for key, entry in self._entries.items() if entry.expires_at() <= now]:
            logger.info("registry: %s expired", key)
            del self._entries[key]
        return [entry.card for entry in self._entries.values()]

    def live_models(self) -> list[ModelCard]:
        """Cards of models that take work now (serving, within their ttl), by model id."""
        return sorted((card for card in self.cards() if card.status == "serving"), key=lambda c: (c.model_id, c.key))

    def live_pools(self) -> set[str]:
        """Pools with at least one serving card."""
        return {card.pool for card in self.live_models()}

    def is_pool_live(self, pool: str) -> bool:
        """True when at least one worker of `pool` serves a model now."""
        return pool in self.live_pools()

    def subscribe(self, broker: KafkaBroker, *, title: str = "model registry") -> None:
        """Feed this view from `broker` (the registry's one partition, assigned, from the beginning) and
        put it in the broker's context, so a handler can take `registry: RegistryView = Context()`."""
        broker.context.set_global(CONTEXT_KEY, self)

        @broker.subscriber(
            partitions=[TopicPartition(topics.REGISTRY, 0, declare=False)],
            auto_offset_reset="earliest",  # no group and no commit: every start replays the compacted log
            ack_policy=AckPolicy.ACK_FIRST,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            title=title,
        )
        async def receive_card(message: KafkaMessage) -> None:
            """Keep the latest card per key; a tombstone removes the key."""
            self.apply_record(message.raw_message)


async def registry_end_offset(bootstrap: str) -> int:
    """The offset the registry's next record will get."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)  # no group: it only asks
    await consumer.start()
    try:
        partition = aiokafka.TopicPartition(topics.REGISTRY, 0)
        ends: dict[aiokafka.TopicPartition, int] = await consumer.end_offsets([partition])
        return ends[partition]
    finally:
        await consumer.stop()
