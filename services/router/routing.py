"""Routing policy: which pool and model serve a request, and why.

In order: an explicit model or pool wins (nothing else applies: the client asked for it); `auto`
compares the score with the threshold; a pool with no live worker is skipped for the other one; a
borderline request leaves a backlogged pool (spill); an open breaker sends the request to the pool's
fallback, or answers it at once with `pool_unavailable`. Each decision carries a `RoutingExplanation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.router.breaker import CircuitBreaker
from services.router.scoring import Score, score_request
from shared import topics
from shared.messages import ChatRequest, RoutedJob, RoutingExplanation, RoutingPolicy
from shared.settings import CommonSettings


class UnroutableError(ValueError):
    """No pool serves the requested model."""


@dataclass(frozen=True)
class PoolView:
    """What the router knows about its pools when it routes a batch.

    `live_pools` None means the registry holds no live card at all (e.g. at start, before the first
    heartbeats): the configuration is trusted then, so the stack can start.
    """

    live_pools: set[str] | None = None
    lag: Mapping[str, int] = field(default_factory=dict)
    queue_ms: Mapping[str, float] = field(default_factory=dict)
    breakers: Mapping[str, CircuitBreaker] = field(default_factory=dict)

    def is_live(self, pool: str) -> bool:
        return self.live_pools is None or pool in self.live_pools

    def breaker_state(self, pool: str) -> str:
        breaker = self.breakers.get(pool)
        return "closed" if breaker is None else breaker.state

    def allows(self, pool: str) -> bool:
        """Whether the pool's breaker lets a request through now (a half-open one: the one probe)."""
        breaker = self.breakers.get(pool)
        return breaker is None or breaker.allow()


@dataclass(frozen=True)
class Decision:
    """The chosen pool and model (pool None: answer `pool_unavailable`), with the explanation."""

    pool: str | None
    model: str | None
    score: float
    reasons: list[str]
    explanation: RoutingExplanation

    @property
    def topic(self) -> str:
        """The jobs topic (or the priority lane) of the chosen pool."""
        assert self.pool is not None
        lane = self.explanation.lane == "priority"
        return topics.priority_topic(self.pool) if lane else topics.jobs_topic(self.pool)

    def to_job(self, request: ChatRequest) -> RoutedJob:
        """The message that carries this decision to the pool's workers."""
        assert self.pool is not None and self.model is not None
        return RoutedJob(
            request_id=request.request_id,
            request=request,
            pool=self.pool,
            model=self.model,
            score=self.score,
            reasons=self.reasons,
            routing=self.explanation,
        )


def decide(
    request: ChatRequest, settings: CommonSettings, view: PoolView | None = None, score: Score | None = None
) -> Decision:
    """Apply the policies (module docstring) to one request; `score` when the batch was scored already."""
    view = view or PoolView()
    score = score or score_request(request)
    routing = settings.routing
    explanation = RoutingExplanation(
        policy="threshold",
        score=min(max(score.value, 0.0), 1.0),
        threshold=routing.threshold,
        contributions=dict(score.contributions),
        lane="priority" if routing.priority.enabled and request.priority >= routing.priority.min_priority else "normal",
    )
    if request.model != "auto":
        return _explicit(request, settings, view, explanation)
    heavy = score.value >= routing.threshold
    scored = routing.heavy_pool if heavy else routing.light_pool
    other = routing.light_pool if heavy else routing.heavy_pool
    reasons = [f"score {score.value:.2f} {'>=' if heavy else '<'} threshold {routing.threshold}", *_features(score)]
    explanation.scored_pool = scored
    pool: str | None
    pool, policy = _live_or_spill(scored, other, score.value, settings=settings, view=view, notes=explanation.notes)
    if not view.allows(pool):
        pool, policy = _breaker_fallback(pool, settings, view, explanation.notes)
    if policy != "threshold":
        reasons.insert(0, explanation.notes[-1])
    explanation.policy, explanation.pool = policy, pool
    model = _default_model(settings, pool) if pool is not None else None
    return Decision(pool, model, explanation.score, reasons, explanation)


def _live_or_spill(
    scored: str, other: str, value: float, *, settings: CommonSettings, view: PoolView, notes: list[str]
) -> tuple[str, RoutingPolicy]:
    """The scored pool, unless it has no live worker (and the other has) or it spills a borderline request."""
    if not view.is_live(scored):
        if view.is_live(other):
            notes.append(f"pool {scored} has no live workers: sent to {other}")
            return other, "no_live_workers"
        notes.append(f"no live workers in {scored} or {other}: queued for {scored}")
        return scored, "threshold"
    spill = settings.routing.spill
    borderline = abs(value - settings.routing.threshold) <= spill.band
    other_takes_it = view.is_live(other) and view.breaker_state(other) == "closed"
    other_has_room = other_takes_it and not _overloaded(other, settings, view)
    if spill.enabled and borderline and other_has_room and _overloaded(scored, settings, view):
        notes.append(f"pool {scored} is backlogged ({_load(scored, view)}): borderline request spilled to {other}")
        return other, "spill"
    return scored, "threshold"


def _overloaded(pool: str, settings: CommonSettings, view: PoolView) -> bool:
    spill = settings.routing.spill
    return view.lag.get(pool, 0) > spill.max_lag or view.queue_ms.get(pool, 0.0) > spill.max_queue_ms


def _load(pool: str, view: PoolView) -> str:
    return f"lag {view.lag.get(pool, 0)}, queue wait {view.queue_ms.get(pool, 0.0):.0f} ms"


def _breaker_fallback(
    pool: str, settings: CommonSettings, view: PoolView, notes: list[str]
) -> tuple[str | None, RoutingPolicy]:
    """The pool's fallback when its breaker is open and the fallback's lets the request through, else None."""
    fallback = settings.routing.fallback.get(pool)
    state = view.breakers[pool].describe()
    if fallback is not None and view.is_live(fallback) and view.allows(fallback):
        notes.append(f"breaker of {pool} is {state}: sent to fallback {fallback}")
        return fallback, "breaker_fallback"
    notes.append(f"breaker of {pool} is {state} and no fallback can take it")
    return None, "pool_unavailable"


def _explicit(
    request: ChatRequest, settings: CommonSettings, view: PoolView, explanation: RoutingExplanation
) -> Decision:
    """The pool or model the request names; it waits in that pool's topic whatever the pool's state."""
    if request.model in settings.pools:
        pool, model, policy, reason = (
            request.model,
            _default_model(settings, request.model),
            "explicit_pool",
            "explicit pool",
        )
    else:
        found = settings.find_model(request.model)
        if found is None:
            known = sorted([*settings.pools, *(m.id for p in settings.pools.values() for m in p.models)])
            raise UnroutableError(f"model {request.model!r} does not exist; choose one of {known} or 'auto'")
        pool, model, policy, reason = found[0], found[1].id, "explicit_model", "explicit model"
    if not view.is_live(pool):
        explanation.notes.append(f"pool {pool} has no live workers: the job waits for one")
    explanation.policy, explanation.pool, explanation.scored_pool = policy, pool, pool  # type: ignore[assignment]
    return Decision(pool, model, explanation.score, [reason], explanation)


def _features(score: Score) -> list[str]:
    """The features that pushed the score up, largest first."""
    ranked = sorted(score.contributions.items(), key=lambda item: -item[1])
    return [f"{name}={value:+.2f}" for name, value in ranked if value > 0]


def _default_model(settings: CommonSettings, pool: str) -> str:
    return settings.pools[pool].models[0].id
