"""The interface every inference backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from shared.messages import ChatMessage


class PermanentBackendError(Exception):
    """The request itself is bad (e.g. the prompt is longer than the model's context); never retried."""


@dataclass(frozen=True)
class GenerationInput:
    """One request of a batch, reduced to what a model needs."""

    request_id: str
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class GenerationOutput:
    """What the model produced for one request (or why it could not)."""

    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "error"]
    error: str | None = None


class Backend(Protocol):
    """A loaded model that generates for a batch of requests."""

    model_id: str

    def generate(self, batch: list[GenerationInput]) -> list[GenerationOutput]:
        """Run one batch; blocking (the worker calls it in a thread). Output order = input order."""
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...
