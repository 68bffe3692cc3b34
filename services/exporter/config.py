"""Exporter settings: the shared deployment settings plus the exporter's own section."""

from pydantic import BaseModel, Field

from shared.settings import CommonSettings


class ExporterOptions(BaseModel):
    """Batching of database writes and where the ops endpoints listen."""

    host: str = "127.0.0.1"
    port: int = Field(default=8102, ge=1, le=65535)
    max_batch_size: int = Field(default=500, ge=1, le=10_000)
    max_wait_ms: int = Field(default=200, ge=1, le=10_000)
    migrate_on_start: bool = True


class ExporterSettings(CommonSettings):
    """Everything the exporter reads (env prefix AUTOGLM_, e.g. AUTOGLM_EXPORTER__PORT)."""

    exporter: ExporterOptions = Field(default_factory=ExporterOptions)
