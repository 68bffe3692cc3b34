"""The exporter's rows, its record-parsing processes and pause logic, without a broker or a database."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime

from aiokafka import ConsumerRecord

from services.exporter.config import ExporterSettings
from services.exporter.handlers import Backoff, families
from services.exporter.parsing import Family, ParsedBatch, RecordParser
from services.exporter.store import dead_letter_row, json_columns, retry_row, routing_decision_row
from shared import topics
from shared.db.tables import RoutingDecisionRow
from shared.messages import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    Choice,
    DeadLetter,
    RoutedJob,
    RoutingExplanation,
    utcnow,
)
from shared.settings import load_settings


def record(
    topic: str, headers: list[tuple[str, bytes]] | None = None, partition: int = 0, offset: int = 0
) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord(topic, partition, offset, 1_700_000_000_000, 0, None, b"{}", None, 0, 2, headers or [])


def job() -> RoutedJob:
    request = ChatRequest(messages=[ChatMessage(role="user", content="hi")])
    routing = RoutingExplanation(policy="spill", score=0.6, threshold=0.5, pool="light")
    return RoutedJob(request_id=request.request_id, request=request, pool="light", model="tiny-light", score=0.6,
                     reasons=["spilled"], routing=routing)  # fmt: skip


def test_a_retry_row_takes_its_attempt_reason_and_time_from_the_headers() -> None:
    headers = [
        (topics.ATTEMPT_HEADER, b"3"),
        (topics.NOT_BEFORE_HEADER, b"1700000001000"),
        (topics.RETRY_ERROR_HEADER, "RuntimeError: CUDA out of memory ☠".encode()),
    ]
    row = retry_row(job(), record(topics.retry_topic("light"), headers))
    assert row["attempt"] == 3 and row["pool"] == "light" and row["error"] == "RuntimeError: CUDA out of memory ☠"
    assert row["not_before"] == datetime(2023, 11, 14, 22, 13, 21, tzinfo=UTC)
    assert row["scheduled_at"] == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def test_a_retry_record_without_headers_is_the_first_retry() -> None:
    row = retry_row(job(), record(topics.retry_topic("light")))
    assert row["attempt"] == 2 and row["error"] is None and row["not_before"] is None


def test_a_routing_decision_row_says_which_lane_and_policy() -> None:
    assert routing_decision_row(job(), topics.priority_topic("light"))["lane"] == "priority"
    row = routing_decision_row(job(), topics.jobs_topic("light"))
    assert row["lane"] == "normal" and row["policy"] == "spill" and row["routing"]["pool"] == "light"


def test_a_dead_letter_is_keyed_by_its_kafka_position_and_trimmed_to_fit() -> None:
    letter = DeadLetter(request_id="x" * 500, source_topic="t", service="router", error_type="E", reason="bad",
                        payload="\x00garbage")  # fmt: skip
    row = dead_letter_row(letter, record(topics.DEADLETTER, partition=0, offset=41))
    assert (row["kafka_partition"], row["kafka_offset"]) == (0, 41) and len(row["request_id"]) == 128


def test_json_columns_come_from_the_table() -> None:
    assert json_columns(RoutingDecisionRow) == {"reasons", "routing"}


def test_every_family_has_its_own_group_and_the_control_topic_is_read_under_one() -> None:
    settings = load_settings(ExporterSettings)
    groups = {family.name: family.group_id for family in families(settings)}
    assert len(set(groups.values())) == len(groups) == 7
    assert groups["cancellations"] == f"autoglm-exporter-{topics.CONTROL}"
    assert groups["requests"] == f"autoglm-exporter-{topics.REQUESTS}"  # unchanged: an upgrade resumes in place


def test_the_pause_doubles_up_to_its_bound_and_a_success_resets_it() -> None:
    backoff = Backoff(initial_s=0.2, max_s=1.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next_delay() == 0.2


def result_record(result: ChatResult, offset: int) -> ConsumerRecord:  # type: ignore[type-arg]
    value = result.model_dump_json().encode()
    return ConsumerRecord(topics.RESULTS, 0, offset, 1_700_000_000_000, 0, None, value, None, 0, len(value), [])


def a_batch() -> tuple[ConsumerRecord, ...]:  # type: ignore[type-arg]
    """A valid result, an invalid record, a probe's result, and a result whose answer holds NUL."""
    ok = ChatResult(request_id="ok", model="tiny-light", created_at=utcnow(),
                    choices=[Choice(message=ChatMessage(role="assistant", content="fine"))])  # fmt: skip
    probe = ChatResult(request_id="probe", probe=True, created_at=utcnow())
    nul = ChatResult(request_id="nul", created_at=utcnow(),
                     choices=[Choice(message=ChatMessage(role="assistant", content="a\x00b"))])  # fmt: skip
    invalid = ConsumerRecord(topics.RESULTS, 0, 1, 0, 0, None, b'{"request_id": 5}', None, 0, 17, [])
    return (result_record(ok, 0), invalid, result_record(probe, 2), result_record(nul, 3))


def results_family() -> Family:
    return next(family for family in families(load_settings(ExporterSettings)) if family.name == "results")


async def parsed_by(parser: RecordParser, batch: tuple[ConsumerRecord, ...]) -> ParsedBatch:  # type: ignore[type-arg]
    await parser.start()
    try:
        return await parser.rows(batch, results_family())
    finally:
        parser.close()


async def test_a_worker_process_parses_a_batch_as_the_service_itself_would() -> None:
    batch = a_batch()
    here = await parsed_by(RecordParser(processes=0, service="exporter"), batch)
    there = await parsed_by(RecordParser(processes=1, service="exporter"), batch)
    assert [record.offset for record, _ in there.rows] == [0, 3]  # the invalid record and the probe skipped
    contents = [values[there.columns.index("content")] for _, values in there.rows]
    assert contents == ["fine", "a\ufffdb"]  # PostgreSQL refuses NUL
    assert there.request_id(there.rows[1][1]) == "nul"
    assert there.columns == here.columns and [values for _, values in there.rows] == [v for _, v in here.rows]


async def test_a_batch_is_still_parsed_when_a_worker_process_dies() -> None:
    parser = RecordParser(processes=1, service="exporter")
    await parser.start()
    try:
        assert parser.pool is not None
        for process in list(parser.pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        parsed = await parser.rows(a_batch(), results_family())
        assert [record.offset for record, _ in parsed.rows] == [0, 3]
        again = await parser.rows(a_batch(), results_family())  # by new worker processes
        assert [record.offset for record, _ in again.rows] == [0, 3]
    finally:
        parser.close()
