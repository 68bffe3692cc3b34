"""The router's own Prometheus metrics (its Kafka traffic is counted by the broker's middleware)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from services.router.breaker import CircuitBreaker

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def register_breaker_gauge(registry: CollectorRegistry, breakers: dict[str, CircuitBreaker]) -> None:
    """`autoglm_router_breaker_state{pool}`: 0 closed, 1 half-open, 2 open, read from the breakers when scraped."""
    gauge = Gauge(
        "autoglm_router_breaker_state", "Circuit breaker of a pool: 0 closed, 1 half-open, 2 open", ["pool"],
        registry=registry,
    )  # fmt: skip
    for pool, breaker in breakers.items():
        gauge.labels(pool).set_function(lambda breaker=breaker: BREAKER_STATES[breaker.state])  # type: ignore[misc]
