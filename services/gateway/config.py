"""Gateway settings: the shared deployment settings plus the gateway's own section."""

from typing import Self

from pydantic import BaseModel, Field, SecretStr, model_validator

from shared.settings import CommonSettings

DEFAULT_ROLES = {
    "admin": ["*"],
    "user": ["chat", "models", "requests:own", "feedback"],
    "reader": ["models"],
}


class Limits(BaseModel):
    """What one request, one key and this gateway may use (per-key rates: overridable per key)."""

    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Chat completions per key per minute; none: unlimited."
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Prompt estimate + max_tokens per key per minute; none: unlimited."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Larger request bodies get 413.")
    max_messages: int = Field(default=256, ge=1, description="Messages per request (a model may set its own).")
    max_in_flight: int = Field(default=256, ge=1, description="Requests waiting in this gateway; beyond: 503.")
    backlog_cache_s: float = Field(default=3.0, ge=0, description="How long a reading of the pools' lag is reused.")


class CacheOptions(BaseModel):
    """Exact-match cache of deterministic answers (temperature 0 or a seed), per gateway instance."""

    enabled: bool = True
    max_entries: int = Field(default=1024, ge=0)
    ttl_s: float = Field(default=300.0, gt=0)


class GatewayOptions(BaseModel):
    """HTTP listener, this instance's reply partition, and time limits."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    instance: int = Field(
        default=0, ge=0, description="Index of this gateway; it owns partition `instance` of autoglm.replies."
    )
    request_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    async_deadline_s: float = Field(
        default=3600.0, gt=0, description="How long an async request (Prefer: respond-async) may wait to run."
    )
    readiness_ttl_s: float = Field(default=5.0, ge=0, description="How long a passing end-to-end probe counts.")
    readiness_timeout_s: float = Field(default=5.0, gt=0)
    cache: CacheOptions = Field(default_factory=CacheOptions)
    roles: dict[str, list[str]] = Field(
        default_factory=lambda: {role: list(permissions) for role, permissions in DEFAULT_ROLES.items()},
        description="Role name -> permissions (chat, models, requests:own, requests:all, feedback, keys; * is all).",
    )
    key_cache_ttl_s: float = Field(
        default=5.0, ge=0, description="How long a checked key is trusted without asking PostgreSQL again."
    )
    limits: Limits = Field(default_factory=Limits)


class GatewaySettings(CommonSettings):
    """Everything the gateway reads (env prefix AUTOGLM_, e.g. AUTOGLM_GATEWAY__INSTANCE=1)."""

    gateway: GatewayOptions = Field(default_factory=GatewayOptions)
    admin_key: SecretStr | None = Field(
        default=None, min_length=20, description="AUTOGLM_ADMIN_KEY: registered as an admin API key at start."
    )

    @model_validator(mode="after")
    def _instance_has_a_reply_partition(self) -> Self:
        if self.gateway.instance >= self.topics.replies.partitions:
            raise ValueError(
                f"gateway.instance: {self.gateway.instance} needs a reply partition, but "
                f"topics.replies.partitions is {self.topics.replies.partitions}"
            )
        return self

    @model_validator(mode="after")
    def _there_is_an_admin_role(self) -> Self:
        if "admin" not in self.gateway.roles:
            raise ValueError("gateway.roles: needs an `admin` role (AUTOGLM_ADMIN_KEY is registered with it)")
        return self
