"""The PostgreSQL schema every service shares: tables, Alembic migrations and the engine."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def make_engine(database_url: str, pool_size: int = 4) -> AsyncEngine:
    """An asyncpg engine that checks connections before use (PostgreSQL may have restarted)."""
    return create_async_engine(database_url, pool_size=pool_size, pool_pre_ping=True)


def storable(text: str) -> bool:
    """Whether PostgreSQL's text types can hold `text` (they refuse NUL): an id that is not can match no row."""
    return "\x00" not in text
