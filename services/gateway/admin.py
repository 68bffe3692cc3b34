"""Admin routes: create, list and revoke API keys (permission `keys`, which only `admin` has by default)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.auth import Authenticator, KeysAdmin
from services.gateway.dependencies import from_state
from services.gateway.errors import ApiError
from services.gateway.protocol import ErrorResponse
from shared.db.keys import ApiKey, KeyStore


class KeyCreation(BaseModel):
    """`POST /v1/admin/keys` body."""

    model_config = ConfigDict(extra="forbid", strict=True)  # e.g. `stream: 0` is a 400, not False

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$", examples=["ci"])  # no controls
    role: str = Field(min_length=1, max_length=64, examples=["user"])
    # le: PostgreSQL's integer column
    requests_per_minute: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Default: the gateway's.")
    tokens_per_minute: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Default: the gateway's.")


class KeyInfo(BaseModel):
    """A key as admins see it: never its secret."""

    id: str = Field(examples=["key_0f3a9c2b5d7e1f00"])
    object: Literal["api_key"] = "api_key"
    name: str
    role: str
    prefix: str = Field(description="The first characters of the key, to recognise it by.", examples=["sk-agl-3fA9"])
    created_at: int = Field(description="Unix seconds.")
    revoked_at: int | None = Field(default=None, description="Unix seconds; null while the key works.")
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyInfo:
        return cls(
            id=key.key_id,
            name=key.name,
            role=key.role,
            prefix=key.prefix,
            created_at=unix(key.created_at),
            revoked_at=None if key.revoked_at is None else unix(key.revoked_at),
            requests_per_minute=key.requests_per_minute,
            tokens_per_minute=key.tokens_per_minute,
        )


class CreatedKey(KeyInfo):
    """A new key: the only answer that carries the secret."""

    key: str = Field(description="The API key itself. It is not stored and cannot be shown again.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


KeyStoreDep = Annotated[KeyStore, Depends(from_state("keys", KeyStore))]
AuthenticatorDep = Annotated[Authenticator, Depends(from_state("auth", Authenticator))]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404)}

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS)  # type: ignore[arg-type]


@router.post("/keys", status_code=201, response_model=CreatedKey)
async def create_key(
    body: KeyCreation, admin: KeysAdmin, store: KeyStoreDep, authenticator: AuthenticatorDep
) -> CreatedKey:
    """Create an API key; the answer shows the key once."""
    if body.role not in authenticator.roles:
        raise ApiError(
            400,
            f"Unknown role '{body.role}' (roles: {', '.join(sorted(authenticator.roles))})",
            "invalid_request_error",
            "role",
            "unknown_role",
        )
    key, plaintext = await store.create(body.name, body.role, body.requests_per_minute, body.tokens_per_minute)
    return CreatedKey(**KeyInfo.of(key).model_dump(), key=plaintext)


@router.get("/keys", response_model=KeyList)
async def list_keys(admin: KeysAdmin, store: KeyStoreDep) -> KeyList:
    """Every key, revoked ones included, without secrets."""
    return KeyList(data=[KeyInfo.of(key) for key in await store.all_keys()])


@router.delete("/keys/{key_id}", response_model=KeyInfo)
async def revoke_key(key_id: str, admin: KeysAdmin, store: KeyStoreDep, authenticator: AuthenticatorDep) -> KeyInfo:
    """Revoke a key: at once on this gateway, within `key_cache_ttl_s` on the others."""
    key = await store.revoke(key_id)
    if key is None:
        raise ApiError(404, f"No API key '{key_id}'", "invalid_request_error", "key_id", "key_not_found")
    authenticator.forget(key_id)
    return KeyInfo.of(key)
