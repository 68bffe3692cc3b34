"""Builds the gateway: FastAPI for HTTP, a Kafka broker for requests and replies."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app

from services.gateway.admin import router as admin_router
from services.gateway.api import router
from services.gateway.auth import Authenticator
from services.gateway.cache import ResponseCache
from services.gateway.config import GatewaySettings
from services.gateway.errors import install_error_handlers
from services.gateway.handlers import register_handlers
from services.gateway.idempotency import IdempotentCompletions
from services.gateway.leaderboard import router as leaderboard_router
from services.gateway.limits import Admission, BodySizeLimit
from services.gateway.observability import install_http_observability
from services.gateway.replies import ReplyWaiters
from services.gateway.serving import ChatService
from shared import topics
from shared.db import make_engine
from shared.db.keys import KeyStore
from shared.db.migrate import upgrade_async
from shared.kafka import ensure_topics, make_broker
from shared.registry import RegistryView
from shared.settings import load_settings
from shared.telemetry import setup_tracing

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
    registry = CollectorRegistry()
    setup_tracing(SERVICE, settings, registry)
    broker = make_broker(settings, service=SERVICE, registry=registry)
    waiters = ReplyWaiters(registry)
    cache = ResponseCache(settings.gateway.cache.max_entries, settings.gateway.cache.ttl_s, registry)
    chat = ChatService(broker, settings, waiters, cache)
    readiness = Readiness(chat, settings.gateway.readiness_ttl_s)
    engine = make_engine(settings.database_url)  # API keys; request status and idempotency read the stored bus

    registry_view = RegistryView()  # `registry` is the metrics registry
    keys = KeyStore(engine)
    auth = Authenticator(keys, settings.gateway.roles, settings.gateway.key_cache_ttl_s)
    admission = Admission(settings, registry)

    register_handlers(broker, settings, waiters)
    registry_view.subscribe(broker, title="model registry (gateway)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await upgrade_async(settings.database_url)  # the api_keys table; advisory-locked against other migrators
        await register_admin_key(settings, keys)
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
            await admission.close()
            await engine.dispose()

    app = FastAPI(title="Open-AutoGLM gateway", version="0.1.0", lifespan=lifespan)
    app.state.chat = chat
    app.state.broker = broker
    app.state.registry = registry_view
    app.state.engine = engine
    app.state.idempotent = IdempotentCompletions(chat, engine)
    app.state.keys = keys
    app.state.auth = auth
    app.state.admission = admission
    install_error_handlers(app)
    install_http_observability(app, registry)
    app.add_middleware(BodySizeLimit, max_bytes=settings.gateway.limits.max_body_bytes, rejections=admission.rejections)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(leaderboard_router)
    add_ops_routes(app, readiness, registry)
    return app


async def register_admin_key(settings: GatewaySettings, keys: KeyStore) -> None:
    """Store AUTOGLM_ADMIN_KEY as an admin key (once: a key already stored is left as it is)."""
    if settings.admin_key is None:
        return
    key = await keys.register(settings.admin_key.get_secret_value(), name="AUTOGLM_ADMIN_KEY", role="admin")
    if not key.active or key.role != "admin":
        logger.warning("AUTOGLM_ADMIN_KEY is stored as %s (role %s, revoked: %s)", key.key_id, key.role, not key.active)
    else:
        logger.info("AUTOGLM_ADMIN_KEY is admin key %s (%s...)", key.key_id, key.prefix)


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
