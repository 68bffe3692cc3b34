"""Starts a real stack for end-to-end tests: Kafka, PostgreSQL, Jaeger and the four services.

Infrastructure comes from the project's own scripts (deploy/local/), in a test-only var dir and
on test-only ports, so a `make run` stack on the default ports is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.db.keys import generate_key
from shared.settings import var_dir

REPO = Path(__file__).resolve().parents[2]
TEST_VAR_DIR = var_dir() / "test"
# Test-only ports, overridable so that several test sessions can run side by side.
KAFKA_PORT = int(os.environ.get("AUTOGLM_TEST_KAFKA_PORT", "29092"))
PG_PORT = int(os.environ.get("AUTOGLM_TEST_PG_PORT", "55433"))
PORT_BASE = int(os.environ.get("AUTOGLM_TEST_PORT_BASE", "18000"))
# Jaeger: query API / UI on the base, OTLP gRPC +1, OTLP HTTP +2, query gRPC +3, health +4.
JAEGER_PORT_BASE = int(os.environ.get("AUTOGLM_TEST_JAEGER_PORT_BASE", "26686"))
GATEWAY_PORT = PORT_BASE


def infra_env() -> dict[str, str]:
    """Environment for the deploy/local scripts: test var dir and ports."""
    return {
        **os.environ,
        "AUTOGLM_VAR_DIR": str(TEST_VAR_DIR),
        "AUTOGLM_KAFKA_PORT": str(KAFKA_PORT),
        "AUTOGLM_PG_PORT": str(PG_PORT),
        "AUTOGLM_JAEGER_PORT_BASE": str(JAEGER_PORT_BASE),
    }


def run_script(script: str, *args: str, timeout: float = 900) -> str:
    """Run a deploy/local script; its progress lines go to the test log."""
    completed = subprocess.run(
        ["bash", str(REPO / "deploy" / "local" / script), *args],
        env=infra_env(), check=True, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    sys.stderr.write(completed.stdout + completed.stderr)
    return completed.stdout.strip()


@dataclass
class Infra:
    """Where the test Kafka, PostgreSQL and Jaeger are."""

    kafka_bootstrap: str
    database_url: str
    jaeger_url: str = f"http://127.0.0.1:{JAEGER_PORT_BASE}"
    """Jaeger's query API (and UI)."""
    otlp_endpoint: str = f"http://127.0.0.1:{JAEGER_PORT_BASE + 2}"
    """Jaeger's OTLP/HTTP receiver."""


def start_infra() -> Infra:
    """Start (or reuse) the test Kafka, PostgreSQL and Jaeger (built on first use)."""
    run_script("kafka.sh", "start")
    run_script("postgres.sh", "start")
    run_script("jaeger.sh", "start", timeout=2400)  # the first start builds Jaeger: minutes on 2 cores
    bootstrap = os.environ.get("AUTOGLM_KAFKA_BOOTSTRAP", f"127.0.0.1:{KAFKA_PORT}")
    return Infra(kafka_bootstrap=bootstrap, database_url=run_script("postgres.sh", "url").splitlines()[-1])


def stop_infra() -> None:
    """Stop the test Kafka, PostgreSQL and Jaeger (the data stays for the next run; Jaeger's is in memory)."""
    run_script("jaeger.sh", "stop")
    run_script("kafka.sh", "stop")
    run_script("postgres.sh", "stop")


@dataclass
class Service:
    """One service process of the stack under test."""

    name: str
    module: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return TEST_VAR_DIR / "logs" / f"{self.name}.log"

    def start(self, base_env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=REPO, env={**base_env, **self.env},
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit code (killed after `timeout`: -9)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """The four services running against the test infrastructure."""

    infra: Infra
    env: dict[str, str]
    services: list[Service] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{GATEWAY_PORT}"

    @property
    def api_key(self) -> str:
        """The stack's admin key (AUTOGLM_ADMIN_KEY of its gateway), new for every session."""
        return self.env["AUTOGLM_ADMIN_KEY"]

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> None:
        for service in self.services:
            service.start(self.env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait for every service's /readyz (the gateway's covers the whole path)."""
        deadline = time.monotonic() + timeout
        for service in self.services:
            self.wait_for(service, deadline)

    def wait_for(self, service: Service, deadline: float) -> None:
        """Wait until `service` answers /readyz with 200; fail if it exits or `deadline` passes."""
        while not self._ready(service):
            if service.process is not None and service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service.name} not ready:\n{service.log_tail()}")
            time.sleep(0.5)

    @contextmanager
    def extra_gateway(self, name: str, port: int, instance: int, **settings: str) -> Iterator[Service]:
        """Another gateway (its own reply partition and port) on this stack, ready; stopped cleanly after."""
        env = {"AUTOGLM_GATEWAY__INSTANCE": str(instance), "AUTOGLM_GATEWAY__PORT": str(port), **settings}
        gateway = Service(name, "services.gateway", port, env)
        gateway.start(self.env)
        try:
            self.wait_for(gateway, time.monotonic() + 120)
            yield gateway
        finally:
            code = gateway.stop()
            assert code in (0, -15), gateway.log_tail()  # -15: uvicorn re-raises SIGTERM after a clean stop

    @staticmethod
    def _ready(service: Service) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{service.port}/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> dict[str, int]:
        """Stop every service gracefully; their exit codes by name."""
        return {service.name: service.stop() for service in reversed(self.services)}


def worker_service(pool: str, port: int) -> Service:
    """A worker process for `pool` with its ops endpoints on `port`."""
    env = {"AUTOGLM_WORKER__POOL": pool, "AUTOGLM_WORKER__PORT": str(port)}
    return Service(f"worker-{pool}", "services.worker", port, env)


def build_stack(infra: Infra, models_dir: Path) -> Stack:
    """The stack's services (not started), configured for the test infrastructure."""
    env = {
        **os.environ,
        "AUTOGLM_KAFKA_BOOTSTRAP": infra.kafka_bootstrap,
        "AUTOGLM_DATABASE_URL": infra.database_url,
        "AUTOGLM_MODELS_DIR": str(models_dir),
        "AUTOGLM_LOG_FORMAT": "json",
        "AUTOGLM_TELEMETRY__SPANS": "bus",
        "AUTOGLM_TELEMETRY__OTLP_ENDPOINT": infra.otlp_endpoint,
        "AUTOGLM_GATEWAY__PORT": str(GATEWAY_PORT),
        "AUTOGLM_GATEWAY__REQUEST_TIMEOUT_S": "60",
        "AUTOGLM_ADMIN_KEY": generate_key(),
        "HF_HUB_OFFLINE": "1",
    }
    stack = Stack(infra, env)
    stack.services = [
        Service("exporter", "services.exporter", PORT_BASE + 102, {"AUTOGLM_EXPORTER__PORT": str(PORT_BASE + 102)}),
        Service("router", "services.router", PORT_BASE + 101, {"AUTOGLM_ROUTER__PORT": str(PORT_BASE + 101)}),
        worker_service("light", PORT_BASE + 110),
        worker_service("heavy", PORT_BASE + 111),
        Service("gateway", "services.gateway", GATEWAY_PORT, {}),
    ]  # fmt: skip
    return stack
