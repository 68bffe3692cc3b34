"""The exporter's rows and pause logic, without a broker or a database."""

from __future__ import annotations

from datetime import UTC, datetime

from aiokafka import ConsumerRecord

from services.exporter.config import ExporterSettings
from services.exporter.handlers import Backoff, families
from services.exporter.store import dead_letter_row, json_columns, key_columns, retry_row, routing_decision_row
from shared import topics
from shared.db.tables import DeadLetterRow, RetryRow, RoutingDecisionRow
from shared.messages import ChatMessage, ChatRequest, DeadLetter, RoutedJob, RoutingExplanation
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


def test_unique_keys_and_json_columns_come_from_the_tables() -> None:
    assert key_columns(RetryRow) == ("request_id", "attempt")
    assert key_columns(DeadLetterRow) == ("kafka_partition", "kafka_offset")
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
