"""Fixtures of the deployment checks: the checker binaries (skipped, saying why, when they cannot be installed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy import tools


def installed(install: Callable[[], Path]) -> Path:
    """The tool's path, or skip the test with the reason it is not there."""
    try:
        return install()
    except tools.ToolUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def docker_compose() -> Path:
    """Compose v2 (`docker-compose config` needs no engine)."""
    return installed(tools.docker_compose)


@pytest.fixture(scope="session")
def kustomize() -> Path:
    """kustomize, built from the Go module proxy."""
    return installed(lambda: tools.go_tool("kustomize"))
