"""Per-request span and metrics for the HTTP edge: one trace id from the client's request onwards."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.logging import current_trace_id

TRACE_HEADER = "X-Trace-Id"


def install_http_observability(app: FastAPI, registry: CollectorRegistry) -> None:
    """Wrap every API request in a server span (its id returned in X-Trace-Id) and count it."""
    tracer = trace.get_tracer("autoglm.gateway")
    requests = Counter(
        "autoglm_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=registry
    )
    duration = Histogram(
        "autoglm_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry
    )

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if not request.url.path.startswith("/v1/"):
            return await call_next(request)  # ops endpoints: no span, no noise
        started = time.perf_counter()
        with tracer.start_as_current_span(f"{request.method} {request.url.path}", kind=SpanKind.SERVER):
            response = await call_next(request)
            response.headers[TRACE_HEADER] = current_trace_id() or ""
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        duration.labels(request.method, route).observe(time.perf_counter() - started)
        return response
