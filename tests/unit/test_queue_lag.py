"""A pool's queue lag, as the router (spill) and the gateway (Retry-After) read it: both lanes count."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from services.worker.handlers import group_id
from shared.queue_lag import queue_offsets, queue_partitions
from shared.topics import worker_group


def committed_at(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {partition: OffsetAndMetadata(offset, "") for partition, offset in offsets.items()}


def test_the_lag_is_read_for_the_workers_group() -> None:
    assert worker_group("light") == group_id("light")


def test_a_pools_queue_is_its_jobs_topic_and_its_priority_lane() -> None:
    assert queue_partitions("heavy", 2) == [
        TopicPartition("autoglm.jobs.heavy", 0),
        TopicPartition("autoglm.jobs.heavy", 1),
        TopicPartition("autoglm.jobs.heavy.priority", 0),
        TopicPartition("autoglm.jobs.heavy.priority", 1),
    ]


def test_jobs_waiting_in_the_priority_lane_count_as_lag() -> None:
    jobs, urgent = queue_partitions("light", 1)
    ends = {jobs: 10, urgent: 7}
    starts = {jobs: 0, urgent: 0}
    queue = queue_offsets([jobs, urgent], ends, starts, committed_at({jobs: 10, urgent: 2}))
    assert queue.lag == 5  # the normal lane is done, five urgent jobs wait
    assert queue.committed == 12


def test_a_partition_the_group_never_committed_counts_from_its_first_record() -> None:
    jobs, urgent = queue_partitions("light", 1)
    ends = {jobs: 100, urgent: 3}
    starts = {jobs: 90, urgent: 0}  # retention deleted the first 90 jobs: they were never waiting
    committed = {jobs: OffsetAndMetadata(-1, "")}  # the group has no offset here; none at all for the lane
    queue = queue_offsets([jobs, urgent], ends, starts, committed)
    assert queue.lag == 10 + 3
    assert queue.committed == 90


def test_a_commit_behind_the_first_record_counts_only_what_is_still_there() -> None:
    (jobs,) = queue_partitions("light", 1)[:1]
    queue = queue_offsets([jobs], {jobs: 50}, {jobs: 40}, committed_at({jobs: 5}))
    assert queue.lag == 10
