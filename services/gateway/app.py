"""Builds the gateway: FastAPI for HTTP, a Kafka broker for requests and replies."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app

from services.gateway.api import router
from services.gateway.cache import ResponseCache
from services.gateway.config import GatewaySettings
from services.gateway.errors import install_error_handlers
from services.gateway.handlers import register_handlers
from services.gateway.idempotency import IdempotentCompletions
from services.gateway.observability import install_http_observability
from services.gateway.replies import ReplyWaiters
from services.gateway.serving import ChatService
from shared import topics
from shared.db import make_engine
from shared.kafka import ensure_topics, make_broker
from shared.registry import RegistryView
from shared.service import setup_tracing
from shared.settings import load_settings

logger = logging.getLogger(__name__)

SERVICE = "gateway"


class Readiness:
    """Caches the outcome of the end-to-end probe for a few seconds."""

    def __init__(self, chat: ChatService, ttl_s: float) -> None:
        self.chat = chat
        self.ttl_s = ttl_s
        self.passed_at = float("-inf")

    async def check(self) -> str | None:
        """None when a request can complete end to end, else the reason it cannot."""
        if time.monotonic() - self.passed_at < self.ttl_s:
            return None
        reason = await self.chat.probe()
        if reason is None:
            self.passed_at = time.monotonic()
        return reason


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway as a FastAPI app whose lifespan runs the Kafka broker."""
    settings = settings or load_settings(GatewaySettings)
    setup_tracing(SERVICE)
    registry = CollectorRegistry()
    broker = make_broker(settings, service=SERVICE, registry=registry)
    waiters = ReplyWaiters(registry)
    cache = ResponseCache(settings.gateway.cache.max_entries, settings.gateway.cache.ttl_s, registry)
    chat = ChatService(broker, settings, waiters, cache)
    readiness = Readiness(chat, settings.gateway.readiness_ttl_s)
    engine = make_engine(settings.database_url)  # reads the exporter's tables: request status, idempotency

    registry_view = RegistryView()  # `registry` is the metrics registry

    register_handlers(broker, settings, waiters)
    registry_view.subscribe(broker, title="model registry (gateway)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(settings)
        await broker.start()
        logger.info(
            "gateway %d reading replies from %s[%d]",
            settings.gateway.instance,
            topics.REPLIES,
            settings.gateway.instance,
        )
        try:
            yield
        finally:
            await broker.stop()
            await engine.dispose()

    app = FastAPI(title="Open-AutoGLM gateway", version="0.1.0", lifespan=lifespan)
    app.state.chat = chat
    app.state.broker = broker
    app.state.registry = registry_view
    app.state.engine = engine
    app.state.idempotent = IdempotentCompletions(chat, engine)
    install_error_handlers(app)
    install_http_observability(app, registry)
    app.include_router(router)
    add_ops_routes(app, readiness, registry)
    return app


def add_ops_routes(app: FastAPI, readiness: Readiness, registry: CollectorRegistry) -> None:
    """`/healthz`, `/readyz` (a request can complete end to end) and `/metrics`."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": SERVICE}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        reason = await readiness.check()
        if reason is None:
            return JSONResponse({"status": "ready", "service": SERVICE})
        return JSONResponse({"status": "not ready", "service": SERVICE, "reason": reason}, status_code=503)

    app.mount("/metrics", make_asgi_app(registry))
