"""Bring the database schema up to date with Alembic."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration pointing at our migrations and the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))  # configparser syntax
    return config


def upgrade(database_url: str) -> None:
    """Apply every pending migration (blocking; safe to run concurrently and repeatedly)."""
    command.upgrade(alembic_config(database_url), "head")


async def upgrade_async(database_url: str) -> None:
    """`upgrade` from inside an event loop (Alembic's env runs its own loop, so use a thread)."""
    await asyncio.to_thread(upgrade, database_url)
