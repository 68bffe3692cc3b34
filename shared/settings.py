"""Settings shared by every service: the deployment file plus environment overrides.

`deploy/deployment.yaml` is the single source of truth for pools, routing and retries. Any value
can be overridden from the environment with the `AUTOGLM_` prefix and `__` between levels, e.g.
`AUTOGLM_ROUTING__THRESHOLD=0.7` or `AUTOGLM_POOLS__LIGHT__BATCHING__MAX_BATCH_SIZE=8`.
Each service subclasses `CommonSettings` with a section of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "deploy" / "deployment.yaml"
CONFIG_FILE_ENV = "AUTOGLM_CONFIG_FILE"


def var_dir() -> Path:
    """Project-local directory for data, logs and built models."""
    return Path(os.environ.get("AUTOGLM_VAR_DIR", REPO_ROOT / "var"))


class Batching(BaseModel):
    """Dynamic batching of a pool's workers (seed defaults: 32 requests or 50 ms)."""

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: int = Field(default=50, ge=0, le=10_000)


class ModelConfig(BaseModel):
    """One model a pool serves. Which fields matter depends on the pool's backend."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(default="1", description="Model version, reported in the registry.")
    path: Path | None = Field(
        default=None, description="torch / tensorrt: HF-format checkpoint dir; relative paths are under models_dir."
    )
    endpoint: str | None = Field(
        default=None, description="openai: base URL (…/v1); triton: host:port of the gRPC endpoint."
    )
    upstream_model: str | None = Field(default=None, description="Model name at the endpoint (default: id).")
    api_key_env: str | None = Field(default=None, description="openai: env var holding the API key.")
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"
    max_context_tokens: int = Field(default=2048, ge=16)
    default_max_tokens: int = Field(default=64, ge=1)
    max_output_tokens: int | None = Field(
        default=None, ge=1, description="Largest max_tokens a request may ask for (default: max_context_tokens)."
    )
    max_messages: int | None = Field(
        default=None, ge=1, description="Most messages per request (default: the gateway's limits.max_messages)."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="openai / triton: per-call timeout.")


class Resources(BaseModel):
    """What one replica asks of its machine; `autoglm deploy render` turns it into compose and k8s limits."""

    cpu: str = Field(
        default="1", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="Cores, Kubernetes style: 2, 0.5, 500m."
    )
    memory: str = Field(
        default="2Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$", description="Memory, Kubernetes style: 512Mi, 16Gi."
    )
    gpus: int = Field(default=0, ge=0, le=16, description="NVIDIA GPUs per replica (0: none).")


class PoolConfig(BaseModel):
    """A pool of identical workers fed by one jobs topic."""

    models: list[ModelConfig] = Field(min_length=1)
    backend: Literal["torch", "openai", "triton", "tensorrt"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    replicas: int = Field(default=1, ge=0, le=64)
    partitions: int = Field(default=4, ge=1, le=256)
    batching: Batching = Field(default_factory=Batching)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _models_say_where_they_are(self) -> Self:
        needs = "endpoint" if self.backend in ("openai", "triton") else "path"
        for model in self.models:
            if getattr(model, needs) is None:
                raise ValueError(f"model {model.id!r}: the {self.backend} backend needs `{needs}`")
        return self


class SpillConfig(BaseModel):
    """Load-aware spill: borderline requests leave a pool whose backlog passed a bound (nothing is dropped)."""

    enabled: bool = True
    max_lag: int = Field(
        default=64, ge=0, description="Jobs waiting in a pool's topics (its workers' consumer lag) before it spills."
    )
    max_queue_ms: float = Field(
        default=10_000.0, gt=0, description="Recent queue wait of a pool's results (moving average) before it spills."
    )
    band: float = Field(
        default=0.15, ge=0.0, le=1.0, description="A score within this distance of the threshold is borderline."
    )
    lag_cache_s: float = Field(default=1.0, gt=0, description="How long a lag reading is reused.")


class BreakerConfig(BaseModel):
    """Per-pool circuit breaker, fed by the pool's results and the registry."""

    enabled: bool = True
    error_rate: float = Field(default=0.5, gt=0.0, le=1.0, description="Server-error share that opens the breaker.")
    window_s: float = Field(default=30.0, gt=0, description="Results older than this are forgotten.")
    min_requests: int = Field(default=10, ge=1, description="Fewest results in the window before the rate counts.")
    open_s: float = Field(default=15.0, gt=0, description="Open this long, then half-open: one probe goes through.")


class PriorityConfig(BaseModel):
    """Priority lane: requests at or above `min_priority` go to `autoglm.jobs.<pool>.priority`."""

    enabled: bool = True
    min_priority: int = Field(default=5, ge=0, le=9)


class RoutingConfig(BaseModel):
    """Complexity routing and its policies: threshold, live pools, spill, breaker, fallback, priority."""

    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    light_pool: str = "light"
    heavy_pool: str = "heavy"
    spill: SpillConfig = Field(default_factory=SpillConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    fallback: dict[str, str | None] = Field(
        default_factory=dict,
        description="Pool to use while a pool's breaker is open; missing or null: a fast pool_unavailable error.",
    )
    priority: PriorityConfig = Field(default_factory=PriorityConfig)


class Backoff(BaseModel):
    """Exponential backoff between attempts."""

    initial_ms: int = Field(default=200, ge=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    max_ms: int = Field(default=5_000, ge=0)


class RetryConfig(BaseModel):
    """How often failed work is retried (the seeds: at most 3 attempts)."""

    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff: Backoff = Field(default_factory=Backoff)


class TopicSpec(BaseModel):
    """Partition count of one topic."""

    partitions: int = Field(ge=1, le=256)


class TopicsConfig(BaseModel):
    """Partition counts of the fixed topics (jobs topics take theirs from the pool)."""

    requests: TopicSpec = TopicSpec(partitions=4)
    results: TopicSpec = TopicSpec(partitions=4)
    replies: TopicSpec = Field(
        default=TopicSpec(partitions=8),
        description="One partition per gateway instance: the most gateways that can run at once.",
    )
    deadletter: TopicSpec = TopicSpec(partitions=1)
    feedback: TopicSpec = TopicSpec(partitions=1)
    spans: TopicSpec = TopicSpec(partitions=1)
    replication_factor: int = Field(default=1, ge=1)


class TelemetryConfig(BaseModel):
    """Where spans go: over the bus to the exporter (stored, then forwarded), straight to OTLP, or nowhere."""

    spans: Literal["bus", "otlp", "off"] = Field(
        default="bus",
        description="bus: publish to autoglm.spans (the exporter stores them and forwards them to otlp_endpoint); "
        "otlp: each service sends to otlp_endpoint itself; off: trace ids only, no spans leave the process.",
    )
    otlp_endpoint: str = Field(
        default="http://127.0.0.1:4318",
        pattern=r"^https?://",
        description="OTLP/HTTP base URL (Jaeger, a collector); spans are POSTed to <endpoint>/v1/traces.",
    )
    traces_ui: str = Field(
        default="http://127.0.0.1:16686", description="Where people look at traces (Jaeger); printed by `autoglm run`."
    )
    forward_spans: bool = Field(default=True, description="exporter: forward the spans it stores to otlp_endpoint.")
    forward_attempts: int = Field(default=3, ge=1, le=10, description="exporter: tries per batch before giving up.")
    max_queue_size: int = Field(default=4096, ge=16, description="Finished spans held for export; more are dropped.")
    max_export_batch_size: int = Field(default=256, ge=1, le=2048, description="Spans per bus message / OTLP call.")
    schedule_delay_ms: int = Field(
        default=500, ge=10, le=60_000, description="Longest wait before a partial batch goes."
    )


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(env_prefix="AUTOGLM_", env_nested_delimiter="__", extra="ignore", frozen=True)

    kafka_bootstrap: str = "127.0.0.1:19092"
    database_url: str = "postgresql+asyncpg://autoglm:autoglm@127.0.0.1:55432/autoglm"
    models_dir: Path = Field(default_factory=lambda: var_dir() / "models")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    pools: dict[str, PoolConfig] = Field(min_length=1)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    @model_validator(mode="after")
    def _routing_names_known_pools(self) -> Self:
        for field in ("light_pool", "heavy_pool"):
            pool = getattr(self.routing, field)
            if pool not in self.pools:
                raise ValueError(f"routing.{field}: unknown pool {pool!r} (pools: {sorted(self.pools)})")
        for pool, fallback in self.routing.fallback.items():
            if pool not in self.pools or (fallback is not None and fallback not in self.pools):
                raise ValueError(f"routing.fallback: {pool!r} -> {fallback!r} names an unknown pool")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Priority: explicit arguments, then the environment, then the deployment file.
        yaml_file = Path(os.environ.get(CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE))
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file))

    def model_path(self, model: ModelConfig) -> Path:
        """Absolute checkpoint directory of a model (for backends that load one)."""
        if model.path is None:
            raise ValueError(f"model {model.id!r} has no checkpoint path")
        return model.path if model.path.is_absolute() else self.models_dir / model.path

    def find_model(self, model_id: str) -> tuple[str, ModelConfig] | None:
        """The (pool, model) serving `model_id`, or None."""
        for pool_name, pool in self.pools.items():
            for model in pool.models:
                if model.id == model_id:
                    return pool_name, model
        return None


class ConfigError(SystemExit):
    """Raised (and exits the process) when the configuration is invalid."""


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad field, naming it as it is written in the file or the environment."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(settings)"
        env = "AUTOGLM_" + "__".join(str(part) for part in item["loc"]).upper()
        lines.append(f"  {field}: {item['msg']} (set in the deployment file or {env})")
    return "\n".join(lines)


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build settings, or stop the process with a message that names each bad field."""
    try:
        return cls(**overrides)
    except ValidationError as error:
        source = os.environ.get(CONFIG_FILE_ENV, str(DEFAULT_CONFIG_FILE))
        print(f"invalid configuration ({source}):\n{describe_validation_error(error)}", file=sys.stderr)
        raise ConfigError(2) from error
