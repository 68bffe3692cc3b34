"""Routing policy: which pool and model serve a request."""

from __future__ import annotations

from dataclasses import dataclass

from services.router.scoring import score_request
from shared.messages import ChatRequest, RoutedJob
from shared.settings import CommonSettings


class UnroutableError(ValueError):
    """No pool serves the requested model."""


@dataclass(frozen=True)
class Decision:
    """The chosen pool and model, with the score and the reasons."""

    pool: str
    model: str
    score: float
    reasons: list[str]

    def to_job(self, request: ChatRequest) -> RoutedJob:
        """The message that carries this decision to the pool's workers."""
        return RoutedJob(
            request_id=request.request_id,
            request=request,
            pool=self.pool,
            model=self.model,
            score=self.score,
            reasons=self.reasons,
        )


def decide(request: ChatRequest, settings: CommonSettings) -> Decision:
    """An explicit pool or model wins; `auto` compares the complexity score with the threshold."""
    score = score_request(request)
    if request.model == "auto":
        heavy = score.value >= settings.routing.threshold
        pool = settings.routing.heavy_pool if heavy else settings.routing.light_pool
        comparison = ">=" if heavy else "<"
        policy = f"score {score.value:.2f} {comparison} threshold {settings.routing.threshold}"
        return Decision(pool, _default_model(settings, pool), score.value, [policy, *score.reasons()])
    if request.model in settings.pools:
        pool = request.model
        return Decision(pool, _default_model(settings, pool), score.value, ["explicit pool"])
    found = settings.find_model(request.model)
    if found is None:
        known = sorted([*settings.pools, *(m.id for p in settings.pools.values() for m in p.models)])
        raise UnroutableError(f"model {request.model!r} does not exist; choose one of {known} or 'auto'")
    pool, model = found
    return Decision(pool, model.id, score.value, ["explicit model"])


def _default_model(settings: CommonSettings, pool: str) -> str:
    return settings.pools[pool].models[0].id
