"""`make bench` (exporter part): rows/s the exporter stores, against a raw asyncpg COPY of the same rows.

Starts the test Kafka and PostgreSQL, then stores the same N chat results (same content, a new key
per scenario) into the `results` table, in batches of the exporter's `max_batch_size`:
  * raw COPY: asyncpg `copy_records_to_table` straight into the table, from rows built beforehand
    (the ceiling: no parsing, no duplicate check);
  * exporter store path: `copy_records` then `copy_new` (COPY into the table; a staging table and INSERT ... ON CONFLICT
    DO NOTHING only for a batch holding a stored key, which these never do);
  * multi-row INSERT: SQLAlchemy `insert().values(...).on_conflict_do_nothing()`, the exporter's
    previous write path, for reference;
  * exporter end to end: the results published to a topic of the bench's own, then consumed by the
    exporter's subscriber (Kafka fetch, parse, rows, COPY, commit of offsets) until all are stored,
    timed from its consumer's joining the group; records parsed in the exporter's worker process (its
    default, `exporter.parse_processes` 1) and, for comparison, in its own process (0).
Each scenario but the multi-row INSERT runs `--repeat` times, the scenarios in turns; reported: the best run
(the least disturbed) and the median, and each one's ratio to raw COPY's.
Writes bench/results/exporter.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry
from pydantic_core import to_json
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterSettings
from services.exporter.handlers import Persister
from services.exporter.metrics import ExporterMetrics
from services.exporter.parsing import Family, stored_result
from services.exporter.store import copy_new, copy_records, json_columns, result_row
from shared.db import make_engine
from shared.db.migrate import upgrade_async
from shared.db.tables import ResultRow
from shared.kafka import make_broker
from shared.messages import ChatMessage, ChatResult, Choice, RoutingExplanation, Timings, Usage, utcnow
from shared.service import tune_garbage_collector
from shared.settings import load_settings
from tests.bench.serving import write_results
from tests.e2e.harness import REPO, Infra, start_infra, stop_infra
from tests.e2e.test_pipeline import plain_dsn

RESULTS_FILE = REPO / "bench" / "results" / "exporter.json"
ANSWER = "The lighthouse keeper watched the storm roll in, counting the seconds between flashes. " * 3


def sample_results(count: int, tag: str) -> list[ChatResult]:
    """Results as workers publish them: an answer, usage, timings and the router's explanation."""
    routing = RoutingExplanation(policy="threshold", score=0.31, threshold=0.5, pool="light", scored_pool="light",
                                 contributions={"length": 0.12, "code": 0.0, "reasoning": 0.19})  # fmt: skip
    now = utcnow()
    return [
        ChatResult(
            request_id=f"chatcmpl-bench-{tag}-{index:07d}",
            model="tiny-light",
            pool="light",
            score=0.31,
            choices=[Choice(message=ChatMessage(role="assistant", content=ANSWER))],
            usage=Usage(prompt_tokens=12, completion_tokens=48, total_tokens=60),
            timings=Timings(queue_ms=3.2, inference_ms=41.0, total_ms=47.5, batch_size=8),
            created_at=now,
            completed_at=now,
            reasons=["score 0.31 < threshold 0.5"],
            routing=routing,
        )
        for index in range(count)
    ]


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


async def timed(rows: int, work: Callable[[], Awaitable[None]]) -> dict[str, float]:
    started = time.perf_counter()
    await work()
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


async def raw_copy(dsn: str, rows: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """asyncpg COPY straight into `results`, one COPY per batch. Its clock includes the least any writer must
    do to the same rows (JSON columns to text, as asyncpg takes them, by the fastest encoder we know), nothing
    else: no duplicate check, no fallback."""
    columns = list(rows[0])
    as_json = json_columns(ResultRow)
    connection = await asyncpg.connect(dsn)

    async def copy_all() -> None:
        for batch in batches(rows, batch_size):
            records = [tuple(to_json(row[c]).decode() if c in as_json else row[c] for c in columns) for row in batch]
            await connection.copy_records_to_table("results", records=records, columns=columns)

    try:
        return await timed(len(rows), copy_all)
    finally:
        await connection.close()


async def store_path(engine: AsyncEngine, rows: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """The exporter's write path, batch by batch: rows as COPY takes them, then `copy_new`."""

    async def store_all() -> None:
        for batch in batches(rows, batch_size):
            columns = list(batch[0])
            await copy_new(engine, ResultRow, columns, copy_records(ResultRow, columns, batch))

    return await timed(len(rows), store_all)


async def multi_row_insert(engine: AsyncEngine, rows: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """One INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING per batch, through SQLAlchemy. A statement
    holds at most 32767 parameters, so a batch of wide rows is cut smaller (one reason the exporter left it)."""
    batch_size = min(batch_size, 32_767 // len(rows[0]))

    async def insert_all() -> None:
        for batch in batches(rows, batch_size):
            async with engine.begin() as connection:
                await connection.execute(insert(ResultRow).values(batch).on_conflict_do_nothing())

    return await timed(len(rows), insert_all)


async def end_to_end(settings: ExporterSettings, engine: AsyncEngine, count: int, tag: str) -> dict[str, float]:
    """Publish to a topic of our own, then time the exporter's subscriber storing every record, from the moment
    its consumer has joined its group (joining is start-up, not throughput)."""
    topic, dsn = f"autoglm.bench.results.{tag}", plain_dsn(settings.database_url)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=settings.topics.results.partitions, replication_factor=1)]
        )
        await publish(settings, topic, sample_results(count, tag))  # the models are gone once published
        registry = CollectorRegistry()
        broker = make_broker(
            settings, service="exporter-bench", registry=registry, trace_messages=False
        )  # as the exporter
        family = Family("results", [topic], ChatResult, ResultRow, stored_result, f"autoglm-exporter-bench-{tag}")
        persister = Persister(broker, engine, settings, ExporterMetrics.create(registry))
        persister.subscribe(family, settings.exporter)
        await persister.start()  # as the exporter does before it consumes
        tune_garbage_collector()  # as a service does once it is built
        await broker.start()
        try:
            await joined(broker)
            stored = await timed(count, lambda: stored_count_reaches(registry, family.name, count))
            await persister.close(timeout_s=10)
        finally:
            await broker.stop()
        connection = await asyncpg.connect(dsn)
        try:  # the exporter's count is its own word: check the table
            in_table = await connection.fetchval(
                "SELECT count(*) FROM results WHERE request_id LIKE $1", f"chatcmpl-bench-{tag}-%"
            )
        finally:
            await connection.close()
        if in_table != count:
            raise RuntimeError(f"end to end: {in_table} of {count} rows are in the table")
        return stored
    finally:
        await admin.delete_topics([topic])
        await admin.close()


async def publish(settings: ExporterSettings, topic: str, results: list[ChatResult]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sends = [await producer.send(topic, r.model_dump_json().encode(), key=r.request_id.encode()) for r in results]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def joined(broker: KafkaBroker) -> None:
    """Wait until every subscriber's consumer has partitions assigned."""
    consumers = [getattr(subscriber, "consumer", None) for subscriber in broker.subscribers]
    while not all(consumer is not None and consumer.assignment() for consumer in consumers):
        await asyncio.sleep(0.01)
        consumers = [getattr(subscriber, "consumer", None) for subscriber in broker.subscribers]


async def stored_count_reaches(registry: CollectorRegistry, table: str, count: int) -> None:
    """Until the exporter's own counter of stored rows reaches `count` (polling the table would load the
    database the bench is measuring)."""
    labels = {"table": table}
    while (registry.get_sample_value("autoglm_exporter_rows_stored_total", labels) or 0) < count:  # noqa: ASYNC110 - polling a metric
        await asyncio.sleep(0.02)


Scenario = Callable[[str], Awaitable[dict[str, float]]]


async def interleaved(repeat: int, scenarios: dict[str, Scenario]) -> dict[str, dict[str, Any]]:
    """`repeat` rounds of every scenario, each run on new keys, in turns (the order reversed every other round),
    so a slow spell of this noisy shared machine falls on all of them alike. Per scenario: its fastest run
    (the least disturbed), the median and every run's rows/s."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in scenarios}
    for round_ in range(repeat):
        for name in list(scenarios) if round_ % 2 == 0 else list(reversed(scenarios)):
            runs[name].append(await scenarios[name](uuid.uuid4().hex[:8]))
    return {
        name: {**max(done, key=lambda run: run["rows_per_s"]), "runs": len(done),
               "median_rows_per_s": statistics.median(run["rows_per_s"] for run in done),
               "all_rows_per_s": [run["rows_per_s"] for run in done]}
        for name, done in runs.items()
    }  # fmt: skip


async def run_all(infra: Infra, count: int, repeat: int) -> dict[str, Any]:
    settings = load_settings(ExporterSettings, kafka_bootstrap=infra.kafka_bootstrap, database_url=infra.database_url)
    await upgrade_async(settings.database_url)
    engine = make_engine(settings.database_url)
    size, dsn = settings.exporter.max_batch_size, plain_dsn(settings.database_url)
    in_process = settings.model_copy(update={"exporter": settings.exporter.model_copy(update={"parse_processes": 0})})
    try:
        figures = await interleaved(repeat, {
            "raw_copy": lambda tag: raw_copy(dsn, rows_for(count, tag), size),
            "exporter_store_path": lambda tag: store_path(engine, rows_for(count, tag), size),
            "exporter_end_to_end": lambda tag: end_to_end(settings, engine, count, tag),
            "exporter_end_to_end_parsing_in_process": lambda tag: end_to_end(in_process, engine, count, tag),
        })  # fmt: skip
        # Slow: one run on a tenth of the rows is enough to tell its rate.
        slow = {"multi_row_insert": lambda tag: multi_row_insert(engine, rows_for(count // 10, tag), size)}
        figures |= await interleaved(1, slow)
        async with engine.begin() as connection:  # the bench's rows are not traffic: leave no trace
            await connection.exec_driver_sql("DELETE FROM results WHERE request_id LIKE 'chatcmpl-bench-%'")
    finally:
        await engine.dispose()
    ceiling = figures["raw_copy"]["rows_per_s"]
    ratios = {name: round(value["rows_per_s"] / ceiling, 3) for name, value in figures.items() if name != "raw_copy"}
    median_ceiling = figures["raw_copy"]["median_rows_per_s"]
    median_ratios = {name: round(value["median_rows_per_s"] / median_ceiling, 3) for name, value in figures.items()
                     if name != "raw_copy"}  # fmt: skip
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "rows": count, "batch_size": size,
            "table": "results", "scenarios": figures, "ratio_to_raw_copy": ratios,
            "median_ratio_to_raw_copy": median_ratios}  # fmt: skip


def rows_for(count: int, tag: str) -> list[dict[str, Any]]:
    return [result_row(result) for result in sample_results(count, tag)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.exporter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, default=50_000, help="rows per scenario (default 50000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the scenarios, in turns (default 3)")
    args = parser.parse_args(argv)
    print("starting Kafka and PostgreSQL ...", flush=True)
    infra = start_infra()
    try:
        document = asyncio.run(run_all(infra, args.rows, args.repeat))
    finally:
        stop_infra()
    print(json.dumps(document, indent=2))
    write_results(RESULTS_FILE, document)


if __name__ == "__main__":
    main()
