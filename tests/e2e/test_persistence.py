"""The exporter on real Kafka + PostgreSQL: dead letters, cancellations and routing decisions stored; its
metrics; the retention purge; a PostgreSQL outage mid-stream loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.exporter.handlers import commit_offsets
from services.exporter.retention import AGE_COLUMNS, purge_older_than
from shared import topics
from shared.db import make_engine
from shared.db.migrate import upgrade_async
from shared.messages import Feedback, utcnow
from tests.e2e.harness import PORT_BASE, REPO, TEST_VAR_DIR, Infra, Service, Stack
from tests.e2e.test_pipeline import fetch_row, plain_dsn

OUTAGE_PG_PORT = PORT_BASE + 90  # inside this session's port range, apart from the shared test cluster
OUTAGE_EXPORTER_PORT = PORT_BASE + 92


async def wait_until(condition: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        if await condition():
            return
        assert time.monotonic() < deadline, f"{what}: not within {limit_s} s"
        await asyncio.sleep(0.2)


async def send(bootstrap: str, topic: str, *values: bytes, key: bytes | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def test_a_message_nobody_can_read_is_stored_as_a_dead_letter_with_its_reason(stack: Stack) -> None:
    marker = f"garbage-{uuid.uuid4().hex}"
    await send(stack.infra.kafka_bootstrap, topics.REQUESTS, f'{{"not a request": "{marker}"}}'.encode())
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    query = "SELECT * FROM dead_letters WHERE payload LIKE $1"
    try:
        stored = "SELECT count(*) > 0 FROM dead_letters WHERE payload LIKE $1"
        await wait_until(lambda: connection.fetchval(stored, f"%{marker}%"), 30, "dead letter stored")
        await asyncio.sleep(1.0)  # a router that kept reading the batch again would dead-letter it again
        rows = await connection.fetch(query, f"%{marker}%")
    finally:
        await connection.close()
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["source_topic"] == topics.REQUESTS and row["service"] == "router"
    assert row["error_type"] == "ValidationError" and "messages" in row["reason"]  # the reason names the bad field


async def test_a_cancellation_over_http_is_stored_with_who_asked(stack: Stack) -> None:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers) as client:
        response = await client.post(f"/v1/requests/{request_id}/cancel")
    assert response.status_code == 202, response.text
    row = await fetch_row(stack, "cancellations", request_id)
    assert row["requested_by"] and row["reason"] and row["created_at"] is not None


async def test_a_completion_stores_its_routing_decision_as_its_own_row(stack: Stack) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "route me"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=60) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    decision = await fetch_row(stack, "routing_decisions", response.json()["id"])
    result = await fetch_row(stack, "results", response.json()["id"])
    assert decision["pool"] == result["pool"] and decision["lane"] == "normal"
    assert decision["policy"] == "threshold" and 0.0 <= decision["score"] <= 1.0


async def test_metrics_show_rows_per_table_consumer_lag_and_breaker_states(stack: Stack) -> None:
    exporter = next(service for service in stack.services if service.name == "exporter")
    router = next(service for service in stack.services if service.name == "router")
    await wait_until(lambda: has_metric(exporter.port, 'autoglm_exporter_consumer_lag{group="autoglm-router"'), 30,
                     "the router's consumer lag on the exporter's /metrics")  # fmt: skip
    body = {"model": "auto", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=60) as client:
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    await wait_until(lambda: counted(exporter.port, 'autoglm_exporter_rows_stored_total{table="results"}'),
                     30, "the result counted")  # fmt: skip
    exported = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{exporter.port}/metrics", timeout=5)
    for line in (
        'autoglm_exporter_rows_stored_total{table="dead_letters"}',  # every table has its series from the start
        'autoglm_exporter_store_duration_seconds_bucket{le="0.005",table="results"}',
        'autoglm_exporter_batch_rows_bucket{le="1.0",table="routing_decisions"}',
        "autoglm_exporter_database_up 1.0",
    ):
        assert line in exported.text, line
    routed = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{router.port}/metrics", timeout=5)
    assert 'autoglm_router_breaker_state{pool="light"} 0.0' in routed.text  # closed
    assert 'autoglm_router_breaker_state{pool="heavy"}' in routed.text


async def counted(port: int, name: str) -> bool:
    return await asyncio.to_thread(metric, port, name) >= 1


async def has_metric(port: int, prefix: str) -> bool:
    response = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics", timeout=5)
    return prefix in response.text


# --------------------------------------------------------------------------- PostgreSQL outage


def outage_postgres(command: str) -> str:
    """deploy/local/postgres.sh on a cluster of this test's own: stopping it disturbs no other test."""
    env = {**os.environ, "AUTOGLM_VAR_DIR": str(TEST_VAR_DIR / "outage"), "AUTOGLM_PG_PORT": str(OUTAGE_PG_PORT)}
    env.pop("AUTOGLM_DATABASE_URL", None)
    completed = subprocess.run(
        ["bash", str(REPO / "deploy" / "local" / "postgres.sh"), command],
        env=env, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return completed.stdout.strip()


@pytest.fixture
def outage_exporter(infra: Infra) -> Iterator[tuple[Service, str, str]]:
    """An exporter of its own (own consumer groups: their prefix) writing to a PostgreSQL cluster of its own."""
    outage_postgres("start")
    database_url = outage_postgres("url").splitlines()[-1]
    env = {
        "AUTOGLM_KAFKA_BOOTSTRAP": infra.kafka_bootstrap,
        "AUTOGLM_DATABASE_URL": database_url,
        "AUTOGLM_LOG_FORMAT": "json",
        "AUTOGLM_EXPORTER__PORT": str(OUTAGE_EXPORTER_PORT),
        "AUTOGLM_EXPORTER__GROUP_PREFIX": f"autoglm-exporter-outage-{uuid.uuid4().hex[:8]}",
        "AUTOGLM_EXPORTER__MAX_BACKOFF_S": "2",
    }
    exporter = Service("exporter-outage", "services.exporter", OUTAGE_EXPORTER_PORT, env)
    exporter.start({**os.environ, **env})
    try:
        Stack(infra, env).wait_for(exporter, time.monotonic() + 120)
        yield exporter, env["AUTOGLM_EXPORTER__GROUP_PREFIX"], database_url
    finally:
        exporter.stop()
        outage_postgres("stop")  # stopped like the session's own infrastructure; its data stays for the next run


async def stored_feedback(database_url: str, prefix: str) -> tuple[int, int]:
    """(rows, distinct ids) of this stream's feedback; (-1, -1) while PostgreSQL is down."""
    try:
        connection = await asyncpg.connect(plain_dsn(database_url), timeout=2)
    except (OSError, asyncpg.PostgresError):
        return -1, -1
    try:
        row = await connection.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT feedback_id) AS d FROM feedback WHERE feedback_id LIKE $1",
            f"{prefix}%",
        )
        return row["n"], row["d"]
    finally:
        await connection.close()


async def stored_at_least(database_url: str, prefix: str, count: int) -> bool:
    return (await stored_feedback(database_url, prefix))[0] >= count


async def store_failed(port: int) -> bool:
    return await asyncio.to_thread(metric, port, "autoglm_exporter_store_failures_total") >= 1


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples on a service's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def committed_offset(infra: Infra, group: str, topic: str) -> int:
    """The offset a consumer group has committed on partition 0 of `topic` (-1: none yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    committed = offsets.get(TopicPartition(topic, 0))
    return committed.offset if committed is not None else -1


async def test_a_stored_batch_commits_its_own_offsets_not_the_consumers_position(infra: Infra) -> None:
    """The exporter fetches the next batch while one is written: committing the consumer's position would
    claim records not yet stored."""
    topic, group = f"autoglm.test.commit.{uuid.uuid4().hex[:8]}", f"autoglm-test-commit-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    producer = AIOKafkaProducer(bootstrap_servers=infra.kafka_bootstrap, acks="all")
    await producer.start()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=infra.kafka_bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
    try:
        for index in range(10):
            await producer.send_and_wait(topic, f"record {index}".encode())
        await consumer.start()
        records: list[ConsumerRecord] = []
        while len(records) < 10:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(batch)
        await commit_offsets(consumer, tuple(records[:4]))  # the first batch stored, the rest still in hand
        assert await committed_offset(infra, group, topic) == 4
        await commit_offsets(consumer, tuple(records[4:]))
        assert await committed_offset(infra, group, topic) == 10
    finally:
        await consumer.stop()
        await producer.stop()
        await admin.delete_topics([topic])
        await admin.close()


async def test_postgres_outage_mid_stream_loses_nothing_and_duplicates_nothing(
    infra: Infra, outage_exporter: tuple[Service, str, str]
) -> None:
    exporter, group_prefix, database_url = outage_exporter
    prefix, total = f"fb-outage-{uuid.uuid4().hex[:8]}-", 600
    producer = AIOKafkaProducer(bootstrap_servers=infra.kafka_bootstrap, acks="all")
    await producer.start()
    offsets: dict[int, int] = {}  # index -> offset on the feedback topic's single partition

    async def stream(start: int, stop: int) -> None:
        for index in range(start, stop):
            message = Feedback(request_id=f"chatcmpl-{index}", feedback_id=f"{prefix}{index:05d}", score=1.0)
            sent = await producer.send_and_wait(topics.FEEDBACK, message.model_dump_json().encode(), key=b"outage")
            offsets[index] = sent.offset
            await asyncio.sleep(0.01)

    try:
        await stream(0, 200)
        await wait_until(lambda: stored_at_least(database_url, prefix, 200), 60, "caught up before the outage")
        await asyncio.to_thread(outage_postgres, "stop")
        await stream(200, 400)  # sent while PostgreSQL is down
        await wait_until(lambda: store_failed(OUTAGE_EXPORTER_PORT), 30, "the exporter noticed the outage")
        assert metric(OUTAGE_EXPORTER_PORT, "autoglm_exporter_database_up") == 0
        # The exporter has read past what it stored (it parses the next batch while one is written), but
        # nothing sent during the outage is committed: a crash now would lose none of it.
        group = f"{group_prefix}-{topics.FEEDBACK}"
        assert await committed_offset(infra, group, topics.FEEDBACK) <= offsets[200]
        await asyncio.to_thread(outage_postgres, "start")
        await stream(400, total)
    finally:
        await producer.stop()
    await wait_until(lambda: stored_at_least(database_url, prefix, total), 90, "caught up after the outage")
    await asyncio.sleep(2)  # anything redelivered late would show up as a second row now
    assert await stored_feedback(database_url, prefix) == (total, total)
    assert metric(OUTAGE_EXPORTER_PORT, "autoglm_exporter_database_up") == 1
    assert exporter.process is not None and exporter.process.poll() is None, exporter.log_tail()


async def test_the_retention_purge_deletes_only_rows_older_than_the_limit(infra: Infra) -> None:
    engine = make_engine(infra.database_url)
    await upgrade_async(infra.database_url)
    tag, now = uuid.uuid4().hex[:8], utcnow()
    ages = {"old-1": timedelta(days=40), "old-2": timedelta(days=31), "new": timedelta(days=29)}
    rows = [(f"fb-purge-{tag}-{name}", "chatcmpl-x", 1.0, now - age) for name, age in ages.items()]
    connection = await asyncpg.connect(plain_dsn(infra.database_url))
    try:
        await connection.executemany(
            "INSERT INTO feedback (feedback_id, request_id, score, created_at) VALUES ($1, $2, $3, $4)", rows
        )
        deleted = await purge_older_than(engine, days=30, chunk_rows=1)  # a chunk per row: the loop must go on
        left = await connection.fetch("SELECT feedback_id FROM feedback WHERE feedback_id LIKE $1", f"fb-purge-{tag}-%")
    finally:
        await connection.close()
        await engine.dispose()
    assert [row["feedback_id"] for row in left] == [f"fb-purge-{tag}-new"]
    assert deleted["feedback"] >= 2 and set(deleted) == set(AGE_COLUMNS)
