"""Builds the router: broker, subscriber, ops endpoints."""

from __future__ import annotations

import asyncio
import logging

from faststream.asgi import AsgiFastStream
from prometheus_client import CollectorRegistry

from services.router.config import RouterSettings
from services.router.handlers import PoolState, register_handlers
from services.router.learned import load_scorer
from services.router.load import PoolLoad
from services.router.metrics import register_breaker_gauge
from services.router.scoring import use_scorer
from shared.kafka import ensure_topics, make_broker
from shared.registry import RegistryView
from shared.service import ops_routes, tune_garbage_collector
from shared.settings import load_settings
from shared.telemetry import setup_tracing

SERVICE = "router"
logger = logging.getLogger(__name__)


def create_app(settings: RouterSettings | None = None) -> AsgiFastStream:
    """The router as an ASGI FastStream app."""
    settings = settings or load_settings(RouterSettings)
    registry = CollectorRegistry()
    setup_tracing(SERVICE, settings, registry)
    broker = make_broker(settings, service=SERVICE, registry=registry)
    registry_view = RegistryView(replaying=True)
    registry_view.subscribe(broker, title="model registry (router)")  # live pools: routing skips dead ones
    load = PoolLoad(settings)
    state = PoolState(settings, registry_view, load)
    register_handlers(broker, settings, state)
    register_breaker_gauge(registry, state.breakers)

    async def ready() -> str | None:
        return None if await broker.ping(timeout=2.0) else "Kafka is not reachable"

    async def create_topics_and_read_lag() -> None:
        await ensure_topics(settings)
        await load.start()

    async def read_registry() -> None:
        if not await registry_view.replay(settings.kafka_bootstrap):
            logger.warning("the model registry was not read to its end in time: routing with the cards read so far")

    async def install_scorer() -> None:
        use_scorer(await asyncio.to_thread(load_scorer, settings.router.scorer, settings.routing.threshold))
        tune_garbage_collector()  # the embedding model's objects too

    return AsgiFastStream(
        broker,
        asgi_routes=ops_routes(SERVICE, registry, ready),
        on_startup=[create_topics_and_read_lag, install_scorer],
        after_startup=[read_registry],  # the subscribers run by then
        on_shutdown=[load.stop],
        asyncapi_path="/asyncapi",
        logger=logging.getLogger(f"autoglm.app.{SERVICE}"),
    )
