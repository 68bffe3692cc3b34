"""Session fixtures: real Kafka, PostgreSQL and the four services, started once for all e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Infra, Stack, build_stack, start_infra, stop_infra


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    """The test Kafka broker and PostgreSQL cluster, started by the project's scripts."""
    started = start_infra()
    yield started
    stop_infra()


@pytest.fixture(scope="session")
def stack(infra: Infra, tiny_models_dir: Path) -> Iterator[Stack]:
    """The four services, ready end to end; stopped with SIGTERM afterwards."""
    running = build_stack(infra, tiny_models_dir)
    running.start()
    try:
        running.wait_ready()
        yield running
    finally:
        exit_codes = running.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit too.
    unclean = {name: code for name, code in exit_codes.items() if code not in (0, -15)}
    assert not unclean, f"services did not stop cleanly: {unclean}"
    for service in running.services:
        assert "Application shutdown complete" in service.log_tail(), f"{service.name} did not shut down gracefully"
