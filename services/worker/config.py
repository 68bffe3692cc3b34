"""Worker settings: the shared deployment settings plus the worker's own section."""

from typing import Self

from pydantic import BaseModel, Field, model_validator

from shared.registry import RegistryOptions
from shared.settings import CommonSettings, PoolConfig


class WorkerOptions(BaseModel):
    """Which pool this worker serves, where its ops endpoints listen, how it heartbeats to the registry."""

    pool: str = "light"
    host: str = "127.0.0.1"
    port: int = Field(default=8110, ge=1, le=65535)
    registry: RegistryOptions = Field(
        default_factory=RegistryOptions,
        description="Model registry heartbeat and ttl, e.g. AUTOGLM_WORKER__REGISTRY__TTL_S=30.",
    )


class WorkerSettings(CommonSettings):
    """Everything a worker reads (env prefix AUTOGLM_, e.g. AUTOGLM_WORKER__POOL=heavy)."""

    worker: WorkerOptions = Field(default_factory=WorkerOptions)

    @model_validator(mode="after")
    def _pool_exists(self) -> Self:
        if self.worker.pool not in self.pools:
            raise ValueError(f"worker.pool: unknown pool {self.worker.pool!r} (pools: {sorted(self.pools)})")
        return self

    @property
    def pool(self) -> PoolConfig:
        """The configuration of the pool this worker serves."""
        return self.pools[self.worker.pool]
