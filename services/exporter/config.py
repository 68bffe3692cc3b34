"""Exporter settings: the shared deployment settings plus the exporter's own section."""

from pydantic import BaseModel, Field

from shared.settings import CommonSettings


class ExporterOptions(BaseModel):
    """Batching of database writes, retention, and where the ops endpoints listen."""

    host: str = "127.0.0.1"
    port: int = Field(default=8102, ge=1, le=65535)
    max_batch_size: int = Field(default=500, ge=1, le=10_000)
    max_wait_ms: int = Field(default=200, ge=1, le=10_000)
    parse_processes: int = Field(
        default=1,
        ge=0,
        le=32,
        description="Worker processes that parse records into rows while the service writes the previous batch "
        "(0: parse in the service's own process).",
    )
    migrate_on_start: bool = True
    group_prefix: str = Field(
        default="autoglm-exporter",
        min_length=1,
        description="Start of the exporter's consumer group names; another prefix reads the bus again from the start.",
    )
    retention_days: float | None = Field(
        default=30.0, gt=0, description="Rows older than this many days are purged; null keeps everything."
    )
    purge_interval_s: float = Field(default=3600.0, gt=0, description="How often the retention purge runs.")
    purge_chunk_rows: int = Field(
        default=10_000, ge=1, description="Rows deleted per statement: short transactions, no long table locks."
    )
    lag_interval_s: float = Field(
        default=15.0, gt=0, description="How often the consumer lag of every group is read for /metrics."
    )
    max_backoff_s: float = Field(
        default=30.0, gt=0, description="Longest pause between attempts while PostgreSQL is unreachable."
    )


class ExporterSettings(CommonSettings):
    """Everything the exporter reads (env prefix AUTOGLM_, e.g. AUTOGLM_EXPORTER__PORT)."""

    exporter: ExporterOptions = Field(default_factory=ExporterOptions)
