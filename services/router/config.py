"""Router settings: the shared deployment settings plus the router's own section."""

from pydantic import BaseModel, Field

from shared.settings import CommonSettings


class RouterOptions(BaseModel):
    """Where the router's ops endpoints listen."""

    host: str = "127.0.0.1"
    port: int = Field(default=8101, ge=1, le=65535)


class RouterSettings(CommonSettings):
    """Everything the router reads (env prefix AUTOGLM_, e.g. AUTOGLM_ROUTER__PORT)."""

    router: RouterOptions = Field(default_factory=RouterOptions)
