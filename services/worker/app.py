"""Builds a worker: loads its pool's models, then consumes the pool's jobs topic."""

from __future__ import annotations

import asyncio
import logging
import time

from faststream.asgi import AsgiFastStream
from prometheus_client import CollectorRegistry

from services.worker.backends import load_backend
from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel
from services.worker.handlers import SERVICE, register_handlers
from services.worker.metrics import WorkerMetrics
from shared.kafka import ensure_topics, make_broker
from shared.service import ops_routes, setup_tracing
from shared.settings import load_settings

logger = logging.getLogger(__name__)


def load_models(settings: WorkerSettings) -> dict[str, LoadedModel]:
    """Load every model of the worker's pool (blocking; called in a thread at start)."""
    models = {}
    for config in settings.pool.models:
        checkpoint = settings.model_path(config) if config.path is not None else None
        if checkpoint is not None and not (checkpoint / "config.json").exists():
            raise FileNotFoundError(
                f"no checkpoint for model {config.id!r} at {checkpoint}; build the tiny ones with "
                "`autoglm models build-tiny` or point models[].path at an HF-format directory"
            )
        logger.info("loading model %s with the %s backend ...", config.id, settings.pool.backend)
        started = time.perf_counter()
        models[config.id] = LoadedModel(config, load_backend(config, settings.pool, checkpoint))
        logger.info("model %s ready in %.1f s", config.id, time.perf_counter() - started)
    return models


def create_app(settings: WorkerSettings | None = None) -> AsgiFastStream:
    """A worker as an ASGI FastStream app; models load before the subscriber starts."""
    settings = settings or load_settings(WorkerSettings)
    setup_tracing(SERVICE)
    registry = CollectorRegistry()
    broker = make_broker(settings, service=SERVICE, registry=registry)
    models: dict[str, LoadedModel] = {}
    register_handlers(broker, settings, models, WorkerMetrics.create(registry, settings.worker.pool))

    async def load() -> None:
        await ensure_topics(settings)
        models.update(await asyncio.to_thread(load_models, settings))

    async def unload() -> None:
        for model in models.values():
            model.backend.close()
        models.clear()

    async def ready() -> str | None:
        if not models:
            return "models are loading"
        return None if await broker.ping(timeout=2.0) else "Kafka is not reachable"

    return AsgiFastStream(
        broker,
        asgi_routes=ops_routes(f"{SERVICE}-{settings.worker.pool}", registry, ready),
        on_startup=[load],
        after_shutdown=[unload],
        asyncapi_path="/asyncapi",
        logger=logging.getLogger(f"autoglm.app.{SERVICE}"),
    )
