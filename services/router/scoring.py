"""Prompt complexity scoring: the learned scorer when one is installed, else a transparent heuristic.

The router installs the learned scorer (services/router/learned.py) at start with `use_scorer`;
`score_request` then delegates to it. Without one, or if its artefact failed to load, the heuristic
below scores every request.

The score is a weighted sum of simple features of the conversation, squashed into [0, 1]:
  * length of the user's text (long prompts tend to need more capable models),
  * number of turns (history the heavy model is better at using),
  * markers of code, math and multi-step reasoning,
  * a large requested answer (`max_tokens`).
Each feature's contribution (weight x value) is reported, so every decision can be explained.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

from shared.messages import ChatRequest

CODE_MARKERS = re.compile(r"```|\bdef |\bclass |\bfunction\b|\bSELECT\b|#include|=>|\{\s*$", re.M)
MATH_MARKERS = re.compile(r"\b(prove|integral|derivative|equation|theorem|matrix|probability)\b|[=^∑∫√]", re.I)
REASONING_MARKERS = re.compile(
    r"\b(why|explain|analy[sz]e|compare|step by step|reason|design|trade-?offs?|evaluate)\b", re.I
)

WEIGHTS = {
    "length": 1.2,  # per log2 of (chars / 64), capped
    "turns": 0.3,  # per extra user turn, capped
    "code": 1.0,
    "math": 1.0,
    "reasoning": 0.8,
    "long_answer": 0.8,  # max_tokens above 512
}
BIAS = -2.0  # a one-line greeting scores well below 0.5


@dataclass(frozen=True)
class Score:
    """A complexity score in [0, 1] with each feature's contribution to it."""

    value: float
    contributions: dict[str, float]

    def reasons(self) -> list[str]:
        """The features that pushed the score up, largest first, as readable strings."""
        ranked = sorted(self.contributions.items(), key=lambda item: -item[1])
        return [f"{name}={value:+.2f}" for name, value in ranked if value > 0]


def extract_features(request: ChatRequest) -> dict[str, float]:
    """Feature values in roughly [0, 2]; see the module docstring."""
    user_text = "\n".join(m.content for m in request.messages if m.role == "user")
    user_turns = sum(1 for m in request.messages if m.role == "user")
    return {
        "length": min(max(math.log2(max(len(user_text), 1) / 64), 0.0), 4.0),
        "turns": float(min(user_turns - 1, 5)),
        "code": float(bool(CODE_MARKERS.search(user_text))),
        "math": float(bool(MATH_MARKERS.search(user_text))),
        "reasoning": float(bool(REASONING_MARKERS.search(user_text))),
        "long_answer": float((request.max_tokens or 0) > 512),
    }


class RequestScorer(Protocol):
    """Anything that scores one request (the learned `Scorer` does, in batches too)."""

    def score(self, request: ChatRequest) -> Score: ...

    def score_batch(self, requests: list[ChatRequest]) -> list[Score]: ...

    def score_clear(self, requests: list[ChatRequest]) -> list[Score | None]: ...


_installed: list[RequestScorer] = []  # the router's learned scorer, when it loaded


def use_scorer(scorer: RequestScorer | None) -> None:
    """Make `score_request` delegate to `scorer` (None: back to the heuristic)."""
    _installed.clear()
    if scorer is not None:
        _installed.append(scorer)


def score_request(request: ChatRequest) -> Score:
    """Score a request's complexity with the installed scorer, or the heuristic without one."""
    return _installed[0].score(request) if _installed else heuristic_score(request)


def score_batch(requests: list[ChatRequest]) -> list[Score]:
    """One score per request; the learned scorer embeds the batch's borderline prompts in one pass."""
    if _installed:
        return _installed[0].score_batch(requests)
    return [heuristic_score(request) for request in requests]


def score_clear(requests: list[ChatRequest]) -> list[Score | None]:
    """The scores cheap features settle, at once; None for the requests `score_batch` must embed."""
    if _installed:
        return _installed[0].score_clear(requests)
    return [heuristic_score(request) for request in requests]


def heuristic_score(request: ChatRequest) -> Score:
    """Score a request's complexity with the weighted heuristic."""
    contributions = {name: WEIGHTS[name] * value for name, value in extract_features(request).items()}
    logit = BIAS + sum(contributions.values())
    return Score(value=1.0 / (1.0 + math.exp(-logit)), contributions=contributions)
