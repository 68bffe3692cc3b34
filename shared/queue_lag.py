"""How much work a pool's workers have not finished: the consumer lag of both of its lanes.

A pool's queue is its jobs topic and its priority lane (`autoglm.jobs.<pool>` and `.priority`), read by
the one consumer group of its workers. The lag of a partition is its end offset minus the group's
committed offset; where the group has committed nothing yet, the partition's first offset stands in
(not 0: records retention already deleted were never waiting). The router (spill) and the gateway
(Retry-After) both read a pool's load this way, so they agree on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from shared import topics


def queue_partitions(pool: str, partitions: int) -> list[TopicPartition]:
    """Every partition of the pool's jobs topic and of its priority lane (both have the pool's count)."""
    lanes = (topics.jobs_topic(pool), topics.priority_topic(pool))
    return [TopicPartition(topic, index) for topic in lanes for index in range(partitions)]


@dataclass(frozen=True)
class QueueOffsets:
    """One pool's queue: jobs not yet committed by its workers, and the committed positions summed."""

    lag: int
    committed: int


def queue_offsets(
    partitions: list[TopicPartition],
    ends: Mapping[TopicPartition, int],
    starts: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, OffsetAndMetadata],
) -> QueueOffsets:
    """Lag and committed positions over `partitions` from the three offset readings."""
    lag = position_total = 0
    for partition in partitions:
        done = committed.get(partition)
        first = starts.get(partition, 0)
        position = done.offset if done is not None and done.offset >= 0 else first
        lag += max(ends.get(partition, 0) - max(position, first), 0)
        position_total += position
    return QueueOffsets(lag=lag, committed=position_total)


async def read_queue(
    admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, pool: str, partitions: int
) -> QueueOffsets:
    """Read the pool's queue from Kafka (three round trips; callers cache the answer)."""
    wanted = queue_partitions(pool, partitions)
    ends = await consumer.end_offsets(wanted)
    starts = await consumer.beginning_offsets(wanted)
    committed = await admin.list_consumer_group_offsets(topics.worker_group(pool), partitions=wanted)
    return queue_offsets(wanted, ends, starts, committed)
