"""The complexity heuristic and the routing policy."""

from __future__ import annotations

import pytest

from services.router.breaker import CircuitBreaker
from services.router.config import RouterSettings
from services.router.routing import PoolView, UnroutableError, decide
from services.router.scoring import score_request
from shared.messages import ChatMessage, ChatRequest
from shared.settings import SpillConfig


def ask(*contents: str, model: str = "auto", max_tokens: int | None = None) -> ChatRequest:
    messages = [ChatMessage(role="user", content=content) for content in contents]
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens)


def test_a_greeting_scores_low_and_a_hard_prompt_high() -> None:
    assert score_request(ask("hi")).value < 0.2
    hard = "Explain step by step why this code is slow:\n```python\ndef f(n):\n    return sum(range(n))\n```\n" * 8
    assert score_request(ask(hard)).value > 0.8


def test_each_feature_raises_the_score() -> None:
    base = score_request(ask("tell me something")).value
    assert score_request(ask("tell me something", "and more", "and more")).value > base
    assert score_request(ask("prove the theorem")).value > base
    assert score_request(ask("tell me something", max_tokens=2000)).value > base


def test_contributions_explain_the_score() -> None:
    score = score_request(ask("explain why the integral diverges"))
    assert score.contributions["reasoning"] > 0 and score.contributions["math"] > 0
    assert score.reasons()[0].startswith(("math", "reasoning"))


def test_threshold_splits_auto_requests(router_settings: RouterSettings) -> None:
    assert decide(ask("hi"), router_settings).pool == "light"
    hard = decide(ask("Explain step by step and prove it: " + "x" * 2000), router_settings)
    assert hard.pool == "heavy" and hard.model == "tiny-heavy"
    assert hard.reasons[0].startswith("score") and ">= threshold 0.5" in hard.reasons[0]


def test_explicit_pool_and_model_win(router_settings: RouterSettings) -> None:
    assert decide(ask("hi", model="heavy"), router_settings).pool == "heavy"
    assert decide(ask("hi", model="tiny-heavy"), router_settings).model == "tiny-heavy"


def test_unknown_model_is_unroutable(router_settings: RouterSettings) -> None:
    with pytest.raises(UnroutableError, match="gpt-17"):
        decide(ask("hi", model="gpt-17"), router_settings)


HARD = "Explain step by step and prove it: " + "x" * 2000


def borderline(settings: RouterSettings) -> ChatRequest:
    """A request scored just above the threshold (within the spill band)."""
    for length in range(0, 4000, 20):
        request = ask("explain " + "y" * length)
        value = score_request(request).value
        if settings.routing.threshold <= value <= settings.routing.threshold + settings.routing.spill.band:
            return request
    raise AssertionError("no borderline prompt found")


def open_breaker(settings: RouterSettings) -> CircuitBreaker:
    breaker = CircuitBreaker(settings.routing.breaker)
    breaker.mark_unavailable()
    breaker.reason = "test"
    return breaker


def test_the_explanation_holds_score_threshold_policy_and_every_contribution(router_settings: RouterSettings) -> None:
    decision = decide(ask(HARD), router_settings)
    explanation = decision.explanation
    assert explanation.policy == "threshold" and explanation.pool == explanation.scored_pool == "heavy"
    assert explanation.threshold == 0.5 and explanation.score == decision.score >= 0.5
    assert explanation.contributions == score_request(ask(HARD)).contributions
    assert decision.to_job(ask(HARD)).routing == explanation


def test_an_explicit_model_wins_even_over_a_dead_pool(router_settings: RouterSettings) -> None:
    decision = decide(ask(HARD, model="tiny-light"), router_settings, PoolView(live_pools={"heavy"}))
    assert (decision.pool, decision.explanation.policy) == ("light", "explicit_model")
    assert "no live workers" in decision.explanation.notes[0]
    assert decide(ask("hi", model="heavy"), router_settings).explanation.policy == "explicit_pool"


def test_a_pool_without_live_workers_is_skipped(router_settings: RouterSettings) -> None:
    decision = decide(ask(HARD), router_settings, PoolView(live_pools={"light"}))
    assert (decision.pool, decision.model, decision.explanation.policy) == ("light", "tiny-light", "no_live_workers")
    assert decision.explanation.scored_pool == "heavy"
    assert decision.reasons[0] == "pool heavy has no live workers: sent to light"


def test_an_empty_registry_trusts_the_configuration(router_settings: RouterSettings) -> None:
    assert decide(ask(HARD), router_settings, PoolView(live_pools=None)).pool == "heavy"


def test_only_borderline_requests_spill_from_a_backlogged_pool(router_settings: RouterSettings) -> None:
    backlog = PoolView(lag={"heavy": router_settings.routing.spill.max_lag + 1, "light": 0})
    spilled = decide(borderline(router_settings), router_settings, backlog)
    assert (spilled.pool, spilled.explanation.policy) == ("light", "spill")
    assert "backlogged (lag 65" in spilled.explanation.notes[0]
    assert decide(ask(HARD), router_settings, backlog).pool == "heavy"  # far from the threshold: stays
    slow = PoolView(queue_ms={"heavy": router_settings.routing.spill.max_queue_ms + 1})
    assert decide(borderline(router_settings), router_settings, slow).explanation.policy == "spill"


def test_no_spill_when_both_pools_are_backlogged_or_spill_is_off(router_settings: RouterSettings) -> None:
    limit = router_settings.routing.spill.max_lag
    both = PoolView(lag={"heavy": limit + 1, "light": limit + 1})
    assert decide(borderline(router_settings), router_settings, both).pool == "heavy"
    off = router_settings.model_copy(
        update={"routing": router_settings.routing.model_copy(update={"spill": SpillConfig(enabled=False)})}
    )
    assert decide(borderline(router_settings), off, PoolView(lag={"heavy": limit + 1})).pool == "heavy"


def test_an_open_breaker_sends_auto_requests_to_the_fallback(router_settings: RouterSettings) -> None:
    view = PoolView(breakers={"heavy": open_breaker(router_settings)})
    decision = decide(ask(HARD), router_settings, view)
    assert (decision.pool, decision.explanation.policy) == ("light", "breaker_fallback")
    assert decision.explanation.notes == ["breaker of heavy is open (test): sent to fallback light"]


def test_an_open_breaker_without_a_fallback_is_a_fast_error(router_settings: RouterSettings) -> None:
    routing = router_settings.routing.model_copy(update={"fallback": {"heavy": None}})
    settings = router_settings.model_copy(update={"routing": routing})
    decision = decide(ask(HARD), settings, PoolView(breakers={"heavy": open_breaker(settings)}))
    assert decision.pool is None and decision.explanation.policy == "pool_unavailable"


def test_a_high_priority_goes_to_the_priority_lane(router_settings: RouterSettings) -> None:
    urgent = ask("hi").model_copy(update={"priority": router_settings.routing.priority.min_priority})
    assert decide(urgent, router_settings).topic == "autoglm.jobs.light.priority"
    assert decide(urgent, router_settings).explanation.lane == "priority"
    assert decide(ask("hi"), router_settings).topic == "autoglm.jobs.light"
