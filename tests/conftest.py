"""Fixtures shared by every test tier."""

from __future__ import annotations

import pytest

from services.router.config import RouterSettings


@pytest.fixture
def router_settings() -> RouterSettings:
    """Router settings from the real deployment file."""
    return RouterSettings()
