"""The exporter's Prometheus metrics: rows stored per table, store duration, batch sizes, outages, purges."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)


@dataclass(frozen=True)
class ExporterMetrics:
    """Counters and histograms labelled by table."""

    rows_stored: Counter
    rows_duplicate: Counter
    store_seconds: Histogram
    batch_rows: Histogram
    store_failures: Counter
    database_up: Gauge
    rows_purged: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ExporterMetrics:
        """Register the exporter's metrics in `registry`."""
        return cls(
            rows_stored=Counter(
                "autoglm_exporter_rows_stored", "Rows inserted, by table", ["table"], registry=registry
            ),
            rows_duplicate=Counter(
                "autoglm_exporter_rows_duplicate",
                "Rows skipped because their key was already stored (redeliveries), by table",
                ["table"],
                registry=registry,
            ),
            store_seconds=Histogram(
                "autoglm_exporter_store_duration_seconds",
                "Time to store one batch (staging COPY, insert, commit), by table",
                ["table"],
                registry=registry,
            ),
            batch_rows=Histogram(
                "autoglm_exporter_batch_rows",
                "Rows per stored batch, by table",
                ["table"],
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            store_failures=Counter(
                "autoglm_exporter_store_failures",
                "Batches that could not be stored (PostgreSQL unreachable or failing) and will be read again",
                ["table"],
                registry=registry,
            ),
            database_up=Gauge(
                "autoglm_exporter_database_up",
                "1 while the last write to PostgreSQL succeeded; 0 while the exporter is paused and retrying",
                registry=registry,
            ),
            rows_purged=Counter(
                "autoglm_exporter_rows_purged",
                "Rows deleted by the retention purge, by table",
                ["table"],
                registry=registry,
            ),
        )
