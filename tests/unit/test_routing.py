"""The complexity heuristic and the routing policy."""

from __future__ import annotations

import pytest

from services.router.config import RouterSettings
from services.router.routing import UnroutableError, decide
from services.router.scoring import score_request
from shared.messages import ChatMessage, ChatRequest


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
