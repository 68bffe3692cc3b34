"""API keys in PostgreSQL: created, listed, revoked and looked up by the gateway and `autoglm keys` alike.

A key is a random token (`sk-agl-` + 32 random bytes, URL-safe base64). Only its SHA-256 digest is
stored: the token has 256 bits of entropy, so a fast hash is as safe as a slow one here and lets
the gateway look a key up by its digest. The plaintext is shown once, when the key is created.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import storable
from shared.db.tables import ApiKeyRow
from shared.messages import utcnow

KEY_PREFIX = "sk-agl-"
DISPLAY_CHARS = 12  # `sk-agl-` and the first characters of the secret: enough to recognise a key


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret."""

    key_id: str
    name: str
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    requests_per_minute: int | None
    tokens_per_minute: int | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def from_row(cls, row: Row[Any]) -> ApiKey:
        """From a selected `api_keys` row (every column but the hash)."""
        fields = row._mapping
        return cls(**{name: fields[name] for name in cls.__dataclass_fields__})


def generate_key() -> str:
    """A new secret API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    """The stored form of a key: its SHA-256 hex digest."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


class KeyStore:
    """The `api_keys` table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self, name: str, role: str, requests_per_minute: int | None = None, tokens_per_minute: int | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its plaintext (which is not stored: hand it to its owner now)."""
        plaintext = generate_key()
        values = new_row(plaintext, name, role, requests_per_minute, tokens_per_minute)
        async with self.engine.begin() as connection:
            await connection.execute(insert(ApiKeyRow).values(**values))
        stored = await self.get(values["key_id"])
        assert stored is not None
        return stored, plaintext

    async def register(self, plaintext: str, name: str, role: str) -> ApiKey:
        """Store a key chosen elsewhere (AUTOGLM_ADMIN_KEY); a key already stored is left as it is."""
        values = new_row(plaintext, name, role)
        statement = insert(ApiKeyRow).values(**values).on_conflict_do_nothing(index_elements=["key_hash"])
        async with self.engine.begin() as connection:
            await connection.execute(statement)
        stored = await self.find(plaintext, include_revoked=True)
        assert stored is not None
        return stored

    async def find(self, plaintext: str, include_revoked: bool = False) -> ApiKey | None:
        """The key whose secret is `plaintext`; None when unknown (or revoked, unless asked for)."""
        statement = select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(plaintext))
        if not include_revoked:
            statement = statement.where(ApiKeyRow.revoked_at.is_(None))
        return await self._one(statement)

    async def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not."""
        if not storable(key_id):
            return None
        return await self._one(select(ApiKeyRow).where(ApiKeyRow.key_id == key_id))

    async def all_keys(self) -> list[ApiKey]:
        """Every key, oldest first, revoked ones included."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id))
            return [ApiKey.from_row(row) for row in rows.all()]

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key (once: revoking again keeps the first time); None when there is no such key."""
        if not storable(key_id):
            return None
        statement = (
            update(ApiKeyRow)
            .where(ApiKeyRow.key_id == key_id, ApiKeyRow.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        async with self.engine.begin() as connection:
            await connection.execute(statement)
        return await self.get(key_id)

    async def _one(self, statement: Select[Any]) -> ApiKey | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(statement)).first()
        return None if row is None else ApiKey.from_row(row)


def new_row(
    plaintext: str, name: str, role: str, requests_per_minute: int | None = None, tokens_per_minute: int | None = None
) -> dict[str, Any]:
    """The `api_keys` values of a new key."""
    return {
        "key_id": new_key_id(),
        "name": name,
        "role": role,
        "key_hash": hash_key(plaintext),
        "prefix": plaintext[:DISPLAY_CHARS],
        "created_at": utcnow(),
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
    }
