"""Consumer lag of every consumer group, for Prometheus: end offset minus committed offset, per group and topic.

Reading it costs a few round trips per group, so a background task reads it every `interval_s` and
/metrics serves the last reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class ConsumerLag(Collector):
    """Reads the lag of every group whose name starts with `prefix`, for the exporter's `/metrics`."""

    def __init__(self, bootstrap: str, *, prefix: str = "autoglm", interval_s: float = 15.0) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.interval_s = interval_s
        self.lag: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "autoglm_exporter_consumer_lag", "Records not yet committed by a consumer group", labels=["group", "topic"]
        )
        for (group, topic), lag in sorted(self.lag.items()):
            family.add_metric([group, topic], lag)
        yield family

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="consumer lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read_forever(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            await admin.start()
            await consumer.start()
            while True:
                try:
                    self.lag = await read_lag(admin, consumer, self.prefix)
                except Exception as error:  # the last reading stays; Kafka may be restarting
                    logger.warning("reading consumer lag failed (%s: %s)", type(error).__name__, error)
                await asyncio.sleep(self.interval_s)
        finally:
            await consumer.stop()
            await admin.close()


async def read_lag(admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, prefix: str) -> dict[tuple[str, str], int]:
    """Lag per (group, topic) of every group named `prefix...` that has committed offsets."""
    groups = [group_id for group_id, _ in await admin.list_consumer_groups() if group_id.startswith(prefix)]
    committed: dict[str, dict[TopicPartition, int]] = {}
    for group in groups:
        offsets = await admin.list_consumer_group_offsets(group)
        committed[group] = {tp: meta.offset for tp, meta in offsets.items() if meta is not None and meta.offset >= 0}
    partitions = {tp for offsets in committed.values() for tp in offsets}
    ends = await consumer.end_offsets(list(partitions)) if partitions else {}
    lag: dict[tuple[str, str], int] = defaultdict(int)
    for group, offsets in committed.items():
        for tp, offset in offsets.items():
            lag[group, tp.topic] += max(ends.get(tp, offset) - offset, 0)
    return dict(lag)
