"""Who is calling: `Authorization: Bearer <key>` resolved to a `Principal` with its role's permissions.

Keys live in PostgreSQL (`shared/db/keys.py`). A checked key is trusted for `key_cache_ttl_s`
seconds (5 by default) so that not every request asks the database: a key revoked through another
gateway or the CLI stops working within that time (at once on the gateway that revoked it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError

from services.gateway.errors import ApiError
from shared.db.keys import ApiKey, KeyStore, hash_key

logger = logging.getLogger(__name__)

ALL = "*"
CACHE_MAX_ENTRIES = 10_000  # unknown keys are cached too, so a flood of bad keys cannot grow it forever

bearer = HTTPBearer(auto_error=False, description="An Open-AutoGLM API key: `Authorization: Bearer sk-agl-...`")


@dataclass(frozen=True)
class Principal:
    """An authenticated API key: who it is, what its role allows, its own rate limits."""

    key_id: str
    name: str
    role: str
    permissions: frozenset[str]
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def allows(self, permission: str) -> bool:
        """Whether the key's role grants `permission` (`*` grants everything)."""
        return ALL in self.permissions or permission in self.permissions

    def can_see(self, owner_key_id: str | None) -> bool:
        """Whether this key may read or cancel a request made by `owner_key_id`."""
        if self.allows("requests:all"):
            return True
        return self.allows("requests:own") and owner_key_id is not None and owner_key_id == self.key_id


def principal_of(key: ApiKey, roles: dict[str, list[str]]) -> Principal:
    """The principal of a stored key; a role no longer configured grants nothing."""
    return Principal(
        key_id=key.key_id,
        name=key.name,
        role=key.role,
        permissions=frozenset(roles.get(key.role, ())),
        requests_per_minute=key.requests_per_minute,
        tokens_per_minute=key.tokens_per_minute,
    )


class Authenticator:
    """Checks keys against the store, remembering each answer for `ttl_s` seconds."""

    def __init__(self, store: KeyStore, roles: dict[str, list[str]], ttl_s: float) -> None:
        self.store = store
        self.roles = roles
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}  # key hash -> (checked at, principal)

    async def authenticate(self, plaintext: str) -> Principal | None:
        """The principal of an active key; None for an unknown or revoked one."""
        digest = hash_key(plaintext)
        cached = self._cache.get(digest)
        if cached is not None and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        key = await self.store.find(plaintext)
        principal = None if key is None else principal_of(key, self.roles)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache.clear()
        self._cache[digest] = (time.monotonic(), principal)
        return principal

    def forget(self, key_id: str) -> None:
        """Drop a key from the cache (it was just revoked here)."""
        stale = [digest for digest, (_, principal) in self._cache.items() if principal and principal.key_id == key_id]
        for digest in stale:
            del self._cache[digest]


def invalid_key(message: str) -> ApiError:
    return ApiError(
        401, message, "invalid_request_error", None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def masked(plaintext: str) -> str:
    """Enough of a key to recognise it in an error message, never enough to use it."""
    return f"{plaintext[:10]}***" if len(plaintext) > 14 else "***"


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller's principal, or OpenAI's 401."""
    if credentials is None or not credentials.credentials:
        raise invalid_key(
            "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
            "(Authorization: Bearer YOUR_KEY)."
        )
    authenticator: Authenticator = request.app.state.auth
    try:
        principal = await authenticator.authenticate(credentials.credentials)
    except (SQLAlchemyError, OSError) as error:
        logger.error("checking an API key failed: %s", error)
        raise ApiError(
            503, "API keys cannot be checked right now, retry later", "server_error", None, "unavailable"
        ) from error
    if principal is None:
        raise invalid_key(f"Incorrect API key provided: {masked(credentials.credentials)}.")
    return principal


def require(*permissions: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller's principal, which must hold one of `permissions` (else 403)."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        principal = await authenticate(request, credentials)
        if not any(principal.allows(permission) for permission in permissions):
            raise ApiError(
                403,
                f"This API key (role '{principal.role}') lacks the '{permissions[0]}' permission",
                "permission_error",
                None,
                "permission_denied",
            )
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{permissions[0].replace(':', '_')}"
    return dependency


ChatCaller = Annotated[Principal, Depends(require("chat"))]
ModelsReader = Annotated[Principal, Depends(require("models"))]
RequestsCaller = Annotated[Principal, Depends(require("requests:own", "requests:all"))]
KeysAdmin = Annotated[Principal, Depends(require("keys"))]
FeedbackCaller = Annotated[Principal, Depends(require("feedback"))]
