"""Fixtures shared by every test tier."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from services.router.config import RouterSettings
from services.worker.checkpoints import ensure_tiny_checkpoints
from shared.settings import REPO_ROOT, var_dir

# Apps built inside the test process (handler tests) keep their spans to themselves: there is no bus
# to publish them on. The e2e services are separate processes and send theirs (see the harness).
os.environ.setdefault("AUTOGLM_TELEMETRY__SPANS", "off")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Build the tools the selected tests need before any test's clock starts.

    pytest-timeout counts a session fixture's set-up against the first test that uses it, and a first
    build takes minutes on 2 cores (Jaeger from its Go module; kustomize; the Compose binary).
    """
    if any(REPO_ROOT / "tests" / "e2e" in item.path.parents for item in items):
        subprocess.run(["bash", str(REPO_ROOT / "deploy" / "local" / "jaeger.sh"), "build"], check=True, timeout=3600)
    if any(REPO_ROOT / "tests" / "deploy" in item.path.parents for item in items):
        from tests.deploy import tools

        for install in (tools.docker_compose, lambda: tools.go_tool("kustomize")):
            with contextlib.suppress(tools.ToolUnavailable):  # the tests that need it skip, saying why
                install()


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
