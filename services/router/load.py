"""How loaded each pool is: its workers' consumer lag, read from Kafka, and its recent queue wait.

Lag = end offset minus the worker group's committed offset, summed over the pool's jobs and priority
partitions (shared/queue_lag.py, as the gateway reads it). A reading is reused for `lag_cache_s`.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from shared.queue_lag import read_queue
from shared.settings import CommonSettings

logger = logging.getLogger(__name__)

QUEUE_WAIT_SMOOTHING = 0.2
"""Weight of the newest result in the moving average of queue wait."""


class PoolLoad:
    """Lag per pool (cached) and the moving average of queue wait from the pools' results."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.cache_s = settings.routing.spill.lag_cache_s
        self.queue_ms: dict[str, float] = {}
        self._lag: dict[str, int] = {}
        self._read_at = float("-inf")
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Open the admin client and the group-less consumer used to read offsets."""
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
        await self._admin.start()
        await self._consumer.start()

    async def stop(self) -> None:
        """Close both clients."""
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    def observe_queue_ms(self, pool: str, queue_ms: float) -> None:
        """Take in one result's queue wait."""
        previous = self.queue_ms.get(pool, queue_ms)
        self.queue_ms[pool] = previous + QUEUE_WAIT_SMOOTHING * (queue_ms - previous)

    async def lag(self) -> dict[str, int]:
        """Jobs waiting per pool; the last reading when it is fresh, or when Kafka cannot be read now."""
        if time.monotonic() - self._read_at < self.cache_s or self._admin is None:
            return self._lag
        try:
            self._lag = {pool: await self._pool_lag(pool) for pool in self.settings.pools}
        except Exception as error:  # a lag reading must never stop routing
            logger.warning("reading consumer lag failed (%s: %s); using the last reading", type(error).__name__, error)
        self._read_at = time.monotonic()
        return self._lag

    async def _pool_lag(self, pool: str) -> int:
        assert self._admin is not None and self._consumer is not None
        queue = await read_queue(self._admin, self._consumer, pool, self.settings.pools[pool].partitions)
        return queue.lag
