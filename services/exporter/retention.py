"""Retention: a periodic purge of rows older than `exporter.retention_days`, in short chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.exporter.config import ExporterOptions
from services.exporter.metrics import ExporterMetrics

logger = logging.getLogger(__name__)

AGE_COLUMNS = {
    "requests": "created_at",
    "results": "completed_at",
    "feedback": "created_at",
    "routing_decisions": "routed_at",
    "retries": "scheduled_at",
    "dead_letters": "failed_at",
    "cancellations": "created_at",
}
"""Each table the exporter fills, and the indexed timestamp that says how old a row is."""


async def purge_older_than(engine: AsyncEngine, days: float, chunk_rows: int) -> dict[str, int]:
    """Delete rows older than `days` from every table, `chunk_rows` per transaction; rows deleted per table."""
    deleted: dict[str, int] = {}
    for table, column in AGE_COLUMNS.items():
        # A chunk at a time: each transaction is short, and writers are never blocked for long.
        statement = text(
            f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} "
            f"WHERE {column} < now() - make_interval(secs => :seconds) LIMIT :chunk)"
        )
        deleted[table] = 0
        while True:
            async with engine.begin() as connection:
                outcome = await connection.execute(statement, {"seconds": days * 86_400, "chunk": chunk_rows})
            deleted[table] += outcome.rowcount or 0
            if (outcome.rowcount or 0) < chunk_rows:
                break
    return deleted


class Purger:
    """Runs the purge every `purge_interval_s` while the exporter runs (nothing when retention is off)."""

    def __init__(self, engine: AsyncEngine, options: ExporterOptions, metrics: ExporterMetrics) -> None:
        self.engine = engine
        self.options = options
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.options.retention_days is not None:
            self._task = asyncio.create_task(self._run_forever(self.options.retention_days), name="retention purge")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run_forever(self, days: float) -> None:
        while True:
            try:
                deleted = await purge_older_than(self.engine, days, self.options.purge_chunk_rows)
            except Exception as error:  # PostgreSQL away: the next round will catch up
                logger.warning("retention purge failed (%s: %s); trying again later", type(error).__name__, error)
            else:
                for table, rows in deleted.items():
                    self.metrics.rows_purged.labels(table).inc(rows)
                if any(deleted.values()):
                    logger.info("retention purge deleted rows older than %g days: %s", days, deleted)
            await asyncio.sleep(self.options.purge_interval_s)
