"""Builds the exporter: migrates the schema, then persists the bus into PostgreSQL."""

from __future__ import annotations

import logging

from faststream.asgi import AsgiFastStream
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from services.exporter.config import ExporterSettings
from services.exporter.handlers import register_handlers
from services.exporter.spans import register_span_handlers
from shared.db import make_engine
from shared.db.migrate import upgrade_async
from shared.kafka import ensure_topics, make_broker
from shared.service import ops_routes
from shared.settings import load_settings
from shared.telemetry import flush_spans, setup_tracing

SERVICE = "exporter"


def create_app(settings: ExporterSettings | None = None) -> AsgiFastStream:
    """The exporter as an ASGI FastStream app."""
    settings = settings or load_settings(ExporterSettings)
    registry = CollectorRegistry()
    setup_tracing(SERVICE, settings, registry)
    broker = make_broker(settings, service=SERVICE, registry=registry)
    engine = make_engine(settings.database_url)
    register_handlers(broker, settings, engine)
    forwarder = register_span_handlers(broker, settings, engine, registry)

    async def prepare() -> None:
        await ensure_topics(settings)
        if settings.exporter.migrate_on_start:
            await upgrade_async(settings.database_url)

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
        after_shutdown=[close_engine],
        asyncapi_path="/asyncapi",
        logger=logging.getLogger(f"autoglm.app.{SERVICE}"),
    )
