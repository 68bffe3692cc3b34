"""Builds the exporter: migrates the schema, persists the bus into PostgreSQL, purges old rows, reads lag."""

from __future__ import annotations

import logging

from faststream.asgi import AsgiFastStream
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from services.exporter.config import ExporterSettings
from services.exporter.handlers import register_handlers
from services.exporter.metrics import ExporterMetrics
from services.exporter.retention import Purger
from services.exporter.spans import register_span_handlers
from shared.db import make_engine
from shared.db.migrate import upgrade_async
from shared.kafka import ensure_topics, make_broker
from shared.lag import ConsumerLag
from shared.service import ops_routes
from shared.settings import load_settings
from shared.telemetry import flush_spans, setup_tracing

SERVICE = "exporter"
SHUTDOWN_WRITE_TIMEOUT_S = 10.0  # a write still retrying then is cancelled: its records are read again


def create_app(settings: ExporterSettings | None = None) -> AsgiFastStream:
    """The exporter as an ASGI FastStream app."""
    settings = settings or load_settings(ExporterSettings)
    registry = CollectorRegistry()
    setup_tracing(SERVICE, settings, registry)
    # Only batches reach the exporter: FastStream would trace each as a trace of its own, linked to hundreds of
    # requests. `persist` spans (handlers.trace_persisted) put the write into each request's own trace instead.
    broker = make_broker(settings, service=SERVICE, registry=registry, trace_messages=False)
    engine = make_engine(settings.database_url)
    metrics = ExporterMetrics.create(registry)
    persister = register_handlers(broker, settings, engine, metrics)
    forwarder = register_span_handlers(broker, settings, engine, registry)
    purger = Purger(engine, settings.exporter, metrics)
    lag = ConsumerLag(settings.kafka_bootstrap, interval_s=settings.exporter.lag_interval_s)
    lag.register(registry)

    async def prepare() -> None:
        await ensure_topics(settings)
        if settings.exporter.migrate_on_start:
            await upgrade_async(settings.database_url)
        await persister.start()
        await purger.start()
        await lag.start()

    async def stop_background_work() -> None:
        await persister.close(timeout_s=SHUTDOWN_WRITE_TIMEOUT_S)
        await purger.stop()
        await lag.stop()

    async def close_engine() -> None:
        flush_spans()
        if forwarder is not None:
            await forwarder.close()
        await engine.dispose()

    async def ready() -> str | None:
        if not await broker.ping(timeout=2.0):
            return "Kafka is not reachable"
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as error:
            return f"PostgreSQL is not reachable: {type(error).__name__}"
        return None

    return AsgiFastStream(
        broker,
        asgi_routes=ops_routes(SERVICE, registry, ready),
        on_startup=[prepare],
        on_shutdown=[stop_background_work],
        after_shutdown=[close_engine],
        asyncapi_path="/asyncapi",
        logger=logging.getLogger(f"autoglm.app.{SERVICE}"),
    )
