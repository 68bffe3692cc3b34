"""Gateway settings: the shared deployment settings plus the gateway's own section."""

from typing import Self

from pydantic import BaseModel, Field, model_validator

from shared.settings import CommonSettings


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


class GatewaySettings(CommonSettings):
    """Everything the gateway reads (env prefix AUTOGLM_, e.g. AUTOGLM_GATEWAY__INSTANCE=1)."""

    gateway: GatewayOptions = Field(default_factory=GatewayOptions)

    @model_validator(mode="after")
    def _instance_has_a_reply_partition(self) -> Self:
        if self.gateway.instance >= self.topics.replies.partitions:
            raise ValueError(
                f"gateway.instance: {self.gateway.instance} needs a reply partition, but "
                f"topics.replies.partitions is {self.topics.replies.partitions}"
            )
        return self
