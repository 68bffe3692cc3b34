"""`autoglm run`: start every service as a child process and keep them alive.

A child that exits, or whose `/healthz` stops answering, is restarted with exponential backoff
and the restart is logged. Ctrl-C or SIGTERM stops the children gracefully (SIGTERM, then KILL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.db.keys import generate_key
from shared.settings import CommonSettings, var_dir

logger = logging.getLogger("autoglm.supervisor")

HEALTH_INTERVAL_S = 5.0
HEALTH_FAILURES_BEFORE_RESTART = 3
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that lived this long starts its backoff afresh
STOP_TIMEOUT_S = 30.0


@dataclass
class ServiceSpec:
    """One supervised process."""

    name: str
    module: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


@dataclass
class Child:
    """A running (or restarting) service and its restart state."""

    spec: ServiceSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_INITIAL_S


ADMIN_KEY_ENV = "AUTOGLM_ADMIN_KEY"


def local_admin_key(directory: Path) -> tuple[str, str]:
    """AUTOGLM_ADMIN_KEY when set, else the key kept in `directory`/admin.key (made once, mode 0600).

    Returns the key and where it came from.
    """
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV], f"from {ADMIN_KEY_ENV}"
    path = directory / "admin.key"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(generate_key() + "\n")
    return path.read_text().strip(), f"kept in {path}"


def service_specs(
    settings: CommonSettings, gateway_port: int, base_ports: dict[str, int], admin_key: str = ""
) -> list[ServiceSpec]:
    """The processes of a local stack: exporter, router, each pool's workers, gateway."""
    specs = [
        ServiceSpec("exporter", "services.exporter", base_ports["exporter"]),
        ServiceSpec("router", "services.router", base_ports["router"]),
    ]
    port = base_ports["worker"]
    for pool_name, pool in settings.pools.items():
        for replica in range(pool.replicas):
            env = {"AUTOGLM_WORKER__POOL": pool_name, "AUTOGLM_WORKER__PORT": str(port)}
            specs.append(ServiceSpec(f"worker-{pool_name}-{replica}", "services.worker", port, env))
            port += 1
    gateway_env = {ADMIN_KEY_ENV: admin_key} if admin_key else {}
    specs.append(ServiceSpec("gateway", "services.gateway", gateway_port, gateway_env))
    return specs


class Supervisor:
    """Runs the children, restarts them when they die or turn unhealthy, stops them on request."""

    def __init__(self, specs: list[ServiceSpec], log_dir: Path) -> None:
        self.children = [Child(spec) for spec in specs]
        self.log_dir = log_dir
        self.stopping = asyncio.Event()

    async def start(self, child: Child) -> None:
        """Start (or restart) one child, its output appended to var/logs/<name>.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{child.spec.name}.log").open("ab")
        child.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", child.spec.module, *child.spec.args,
            env={**os.environ, **child.spec.env, "AUTOGLM_LOG_FORMAT": "json"},
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        child.started_at = time.monotonic()
        logger.info("started %s (pid %d, port %d)", child.spec.name, child.process.pid, child.spec.port)

    async def watch(self, child: Child) -> None:
        """Keep one child alive until the supervisor stops."""
        await self.start(child)
        failures = 0
        while not self.stopping.is_set():
            assert child.process is not None
            exited = await self._wait_exit(child.process, HEALTH_INTERVAL_S)
            if self.stopping.is_set():
                return
            if exited:
                reason = f"exited with code {child.process.returncode}"
            else:
                failures = 0 if await self._healthy(child) else failures + 1
                if failures < HEALTH_FAILURES_BEFORE_RESTART:
                    continue
                reason = f"failed {failures} health checks"
                await self._terminate(child)
            failures = 0
            await self._restart_after_backoff(child, reason)

    async def _restart_after_backoff(self, child: Child, reason: str) -> None:
        if time.monotonic() - child.started_at > STABLE_AFTER_S:
            child.backoff_s = BACKOFF_INITIAL_S
        child.restarts += 1
        logger.warning(
            "%s %s; restart #%d in %.0f s (log: %s)",
            child.spec.name, reason, child.restarts, child.backoff_s, self.log_dir / f"{child.spec.name}.log",
        )  # fmt: skip
        try:
            await asyncio.wait_for(self.stopping.wait(), child.backoff_s)
            return  # stopping while backing off
        except TimeoutError:
            pass
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
        await self.start(child)

    @staticmethod
    async def _wait_exit(process: asyncio.subprocess.Process, wait_s: float) -> bool:
        try:
            await asyncio.wait_for(process.wait(), wait_s)
            return True
        except TimeoutError:
            return False

    @staticmethod
    async def _healthy(child: Child) -> bool:
        # A starting service may not listen yet (workers load models first): only judge after a grace.
        if time.monotonic() - child.started_at < 120:
            return True
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                response = await client.get(f"http://127.0.0.1:{child.spec.port}/healthz")
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def _terminate(self, child: Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        if not await self._wait_exit(process, STOP_TIMEOUT_S):
            logger.warning("%s did not stop within %.0f s; killing it", child.spec.name, STOP_TIMEOUT_S)
            process.kill()
            await process.wait()

    async def run(self) -> None:
        """Supervise until stop() is called; then stop every child (gateway first, exporter last)."""
        watchers = [asyncio.create_task(self.watch(child)) for child in self.children]
        await self.stopping.wait()
        logger.info("stopping all services ...")
        for child in reversed(self.children):
            await self._terminate(child)
        await asyncio.gather(*watchers, return_exceptions=True)
        logger.info("all services stopped")

    def stop(self) -> None:
        """Ask the supervisor to stop (safe from a signal handler)."""
        self.stopping.set()


async def wait_until_ready(url: str, limit_s: float, supervisor: Supervisor) -> bool:
    """Poll the gateway's /readyz, printing progress, until it answers 200."""
    deadline = time.monotonic() + limit_s
    last_reason = ""
    async with httpx.AsyncClient(timeout=10.0) as client:
        while time.monotonic() < deadline and not supervisor.stopping.is_set():
            try:
                response = await client.get(url)
                if response.status_code == 200:
                    return True
                reason = response.json().get("reason", response.text)
            except httpx.HTTPError as error:
                reason = f"gateway not listening yet ({type(error).__name__})"
            if reason != last_reason:
                print(f"  waiting for the stack: {reason}", flush=True)
                last_reason = reason
            await asyncio.sleep(1.0)
    return False


async def run_stack(settings: CommonSettings, gateway_port: int, base_ports: dict[str, int]) -> int:
    """Start the stack, report when it is ready, and supervise it until Ctrl-C / SIGTERM."""
    admin_key, admin_key_source = local_admin_key(var_dir())
    supervisor = Supervisor(service_specs(settings, gateway_port, base_ports, admin_key), var_dir() / "logs")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, supervisor.stop)
    runner = asyncio.create_task(supervisor.run())
    print(f"starting {len(supervisor.children)} services; logs in {supervisor.log_dir}", flush=True)
    if await wait_until_ready(f"http://127.0.0.1:{gateway_port}/readyz", 600, supervisor):
        print_banner(supervisor, gateway_port, settings)
        print(f"admin API key: {admin_key} ({admin_key_source})\n", flush=True)
    await runner
    return 0


def traces_lines(settings: CommonSettings) -> list[str]:
    """Where to look at traces, unless spans are off."""
    telemetry = settings.telemetry
    if telemetry.spans == "off":
        return ["  Traces       off (telemetry.spans)"]
    stored = ", stored in PostgreSQL table spans" if telemetry.spans == "bus" else ""
    return [f"  Traces       {telemetry.traces_ui}  (Jaeger: a request's trace at /trace/<its X-Trace-Id>{stored})"]


def print_banner(supervisor: Supervisor, gateway_port: int, settings: CommonSettings) -> None:
    """What is where, once the stack answers end to end."""
    lines = [
        "",
        "Open-AutoGLM is ready.",
        f"  OpenAI API   http://127.0.0.1:{gateway_port}/v1  (try: make demo)",
        f"  Kafka        {settings.kafka_bootstrap}",
        f"  PostgreSQL   {settings.database_url}",
        *traces_lines(settings),
        *(f"  {child.spec.name:<12} http://127.0.0.1:{child.spec.port}/metrics" for child in supervisor.children),
        f"  logs         {supervisor.log_dir}",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), flush=True)
