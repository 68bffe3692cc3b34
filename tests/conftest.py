"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.router.config import RouterSettings
from services.worker.checkpoints import ensure_tiny_checkpoints
from shared.settings import var_dir

# Apps built inside the test process (handler tests) keep their spans to themselves: there is no bus
# to publish them on. The e2e services are separate processes and send theirs (see the harness).
os.environ.setdefault("AUTOGLM_TELEMETRY__SPANS", "off")


@pytest.fixture
def router_settings() -> RouterSettings:
    """Router settings from the real deployment file."""
    return RouterSettings()


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """The tiny light and heavy checkpoints, built once and kept between runs in var/test/models."""
    directory = var_dir() / "test" / "models"
    ensure_tiny_checkpoints(directory)
    return directory
