"""What every service has in common: ops endpoints, telemetry, and running under uvicorn."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import uvicorn
from faststream.asgi import AsgiResponse, get
from prometheus_client import CollectorRegistry, make_asgi_app

from shared.logging import setup_logging
from shared.settings import CommonSettings

logger = logging.getLogger(__name__)

GC_THRESHOLDS = (10_000, 50, 100)  # CPython's defaults: (700, 10, 10)

ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else the reason it is not."""


class Listener(Protocol):
    """A settings section that says where a service listens."""

    host: str
    port: int


def _json(status: int, body: dict[str, Any]) -> AsgiResponse:
    return AsgiResponse(json.dumps(body).encode(), status, {"content-type": "application/json"})


def ops_routes(service: str, registry: CollectorRegistry, ready: ReadyCheck) -> list[tuple[str, Any]]:
    """`/healthz` (process alive), `/readyz` (able to do its work) and `/metrics` (Prometheus)."""

    @get(include_in_schema=False)
    async def healthz(scope: Any) -> AsgiResponse:
        return _json(200, {"status": "ok", "service": service})

    @get(include_in_schema=False)
    async def readyz(scope: Any) -> AsgiResponse:
        reason = await ready()
        if reason is None:
            return _json(200, {"status": "ready", "service": service})
        return _json(503, {"status": "not ready", "service": service, "reason": reason})

    return [("/healthz", healthz), ("/readyz", readyz), ("/metrics", make_asgi_app(registry))]


def run_service(
    *,
    service: str,
    settings: CommonSettings,
    create_app: Callable[[Any], Any],
    listen: Listener,
) -> None:
    """Set up logging and serve the app built from `settings` on the service's host and port."""
    setup_logging(service, settings.log_level, settings.log_format)
    app = create_app(settings)
    tune_garbage_collector()
    serve(app, host=listen.host, port=listen.port, service=service)


def tune_garbage_collector() -> None:
    """Collect less often, and never again scan what start-up built.

    Services allocate small objects by the thousand per batch (parsed models, rows). With CPython's
    default thresholds each burst sets off collections that walk every object alive, libraries
    included: parsing a chat result cost 5x its bare time, and a full collection under a loaded
    embedding model (half a million objects) stalls a router for tens of milliseconds. Messages form
    no reference cycles, so rarer collections cost little memory. Run it again after a start-up step
    that builds much (a model loaded) to freeze that too.
    """
    gc.collect()
    gc.freeze()  # what start-up built lives as long as the process: out of every later collection
    gc.set_threshold(*GC_THRESHOLDS)
    # frozen objects are never freed at exit, and native extensions would report them as leaks
    atexit.unregister(gc.unfreeze)  # registered once, however often this runs
    atexit.register(gc.unfreeze)


def parse_help(prog: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`--help` for a service that takes no arguments (its settings come from the file and env)."""
    epilog = "Configured by deploy/deployment.yaml and AUTOGLM_* environment variables (see README)."
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog).parse_args(argv)


def serve(app: Any, *, host: str, port: int, service: str) -> None:
    """Run an ASGI app until SIGTERM/SIGINT, then shut down gracefully (lifespan stops the broker)."""
    logger.info("%s listening on http://%s:%d", service, host, port)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep our structured logging
        access_log=False,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    uvicorn.Server(config).run()
