"""The `make run` supervisor restarts a service that dies, and stops everything on request."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from shared.supervisor import ServiceSpec, Supervisor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_killed_service_is_restarted_and_all_stop_on_request(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="autoglm.supervisor")
    port = free_port()
    spec = ServiceSpec("web", "http.server", port, args=["--bind", "127.0.0.1", str(port)])  # any long-running module
    supervisor = Supervisor([spec], tmp_path)
    runner = asyncio.create_task(supervisor.run())
    child = supervisor.children[0]
    async with asyncio.timeout(20):
        while child.process is None:  # noqa: ASYNC110 - polling the supervisor's state
            await asyncio.sleep(0.05)
        first = child.process
        first.kill()
        while child.process is first:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert child.restarts == 1
    assert any("restart #1" in record.getMessage() for record in caplog.records)
    second = child.process
    assert second is not None and second.returncode is None
    supervisor.stop()
    await asyncio.wait_for(runner, 40)
    assert second.returncode is not None  # stopped, not orphaned
