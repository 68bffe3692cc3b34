"""Gateway settings: the shared deployment settings plus the gateway's own section."""

from pydantic import BaseModel, Field

from shared.settings import CommonSettings


class GatewayOptions(BaseModel):
    """HTTP listener, this instance's reply partition, and time limits."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    instance: int = Field(
        default=0, ge=0, description="Index of this gateway; it owns partition `instance` of autoglm.replies."
    )
    request_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    readiness_ttl_s: float = Field(default=5.0, ge=0, description="How long a passing end-to-end probe counts.")
    readiness_timeout_s: float = Field(default=5.0, gt=0)


class GatewaySettings(CommonSettings):
    """Everything the gateway reads (env prefix AUTOGLM_, e.g. AUTOGLM_GATEWAY__INSTANCE=1)."""

    gateway: GatewayOptions = Field(default_factory=GatewayOptions)
