"""Builds a worker: loads its pool's models, then consumes the pool's jobs topic."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from faststream.asgi import AsgiFastStream
from prometheus_client import CollectorRegistry

from services.worker.backends import load_backend
from services.worker.config import WorkerSettings
from services.worker.execution import LoadedModel
from services.worker.handlers import SERVICE, register_handlers
from services.worker.metrics import WorkerMetrics, register_gpu_gauges
from shared.kafka import ensure_topics, make_broker
from shared.messages import ModelCard, utcnow
from shared.registry import CHAT_INPUTS, CHAT_OUTPUTS, RegistryPublisher, new_instance_id
from shared.service import ops_routes, tune_garbage_collector
from shared.settings import load_settings
from shared.telemetry import setup_tracing

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


def model_card(settings: WorkerSettings, model: LoadedModel, instance_id: str, started_at: datetime) -> ModelCard:
    """The registry card of one loaded model: its configuration plus what its backend reports."""
    info = model.backend.info()
    batching = settings.pool.batching
    max_batch_size = batching.max_batch_size if batching.enabled else 1
    if info.max_batch_size is not None:  # the engine's own limit, when it has one, also binds
        max_batch_size = min(max_batch_size, info.max_batch_size)
    return ModelCard(
        model_id=model.config.id,
        version=model.config.version,
        pool=settings.worker.pool,
        backend=info.backend,
        framework=info.framework,
        precision=info.precision,
        device=info.device,
        max_batch_size=max_batch_size,
        max_context_tokens=model.config.max_context_tokens,
        inputs=CHAT_INPUTS,
        outputs=CHAT_OUTPUTS,
        instance_id=instance_id,
        started_at=started_at,
        ttl_s=settings.worker.registry.ttl_s,
    )


def create_app(settings: WorkerSettings | None = None) -> AsgiFastStream:
    """A worker as an ASGI FastStream app; models load before the subscriber starts, then are registered."""
    settings = settings or load_settings(WorkerSettings)
    registry = CollectorRegistry()
    setup_tracing(SERVICE, settings, registry)
    broker = make_broker(settings, service=SERVICE, registry=registry)
    models: dict[str, LoadedModel] = {}
    publisher: RegistryPublisher | None = None
    register_handlers(broker, settings, models, WorkerMetrics.create(registry, settings.worker.pool))

    async def load() -> None:
        await ensure_topics(settings)
        models.update(await asyncio.to_thread(load_models, settings))
        register_gpu_gauges(registry)
        tune_garbage_collector()  # the models' objects too

    async def register() -> None:
        nonlocal publisher
        instance_id, started_at = new_instance_id(), utcnow()
        cards = [model_card(settings, model, instance_id, started_at) for model in models.values()]
        publisher = RegistryPublisher(broker, cards, settings.worker.registry.heartbeat_s)
        await publisher.start()

    async def deregister() -> None:
        if publisher is not None:
            await publisher.stop()

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
        after_startup=[register],  # the broker is up and the models are loaded: announce them
        on_shutdown=[deregister],  # tombstones go out while the broker can still publish
        after_shutdown=[unload],
        asyncapi_path="/asyncapi",
        logger=logging.getLogger(f"autoglm.app.{SERVICE}"),
    )
