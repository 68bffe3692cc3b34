"""The interface every inference backend implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shared.messages import ChatMessage


class PermanentBackendError(Exception):
    """The request itself is bad (e.g. the prompt is longer than the model's context); never retried."""


class TransientBackendError(Exception):
    """The engine failed for a reason that may pass (a timeout, a restarting server); retried later."""


class BatchTooLargeError(TransientBackendError):
    """The batch did not fit in device memory; the worker splits it and runs the halves."""


GREEDY_BELOW = 1e-5


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
    stream: bool = False  # the caller wants the text as it is generated
    prompt_format: Literal["chat", "text"] = "chat"  # text: one raw prompt, no chat template
    # True once the request is cancelled; engines that decode step by step stop its row early.
    is_cancelled: Callable[[], bool] = field(default=lambda: False, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or so close to it that dividing logits by it overflows to inf."""
        return self.temperature < GREEDY_BELOW


DeltaSink = Callable[[str, str], None]
"""Called with (request_id, text generated since the last call) for each streamed request of a batch."""


@dataclass(frozen=True)
class GenerationOutput:
    """What the model produced for one request (or why it could not)."""

    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "error"]
    error: str | None = None
    error_code: str = "invalid_request"  # OpenAI-style code of `error`, e.g. context_length_exceeded


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded backend tells the model registry about itself."""

    backend: str
    framework: str
    device: str
    precision: str
    version: str = "1"
    max_batch_size: int | None = None


class Backend(Protocol):
    """A loaded model that generates for a batch of requests."""

    model_id: str

    async def agenerate(
        self, batch: list[GenerationInput], on_delta: DeltaSink | None = None
    ) -> list[GenerationOutput]:
        """Run one batch without blocking the event loop. Output order = input order.

        Requests with `stream` set have their text handed to `on_delta` as it is generated, when the
        engine can stream (the final output still holds the whole text); engines that cannot stream
        ignore it, and their callers get the text in one piece with the result.

        Per-request problems are error outputs; whole-batch failures raise TransientBackendError
        (retried), BatchTooLargeError (split) or PermanentBackendError (answered with an error).
        """
        ...

    def info(self) -> BackendInfo:
        """Metadata for the model registry."""
        ...

    def close(self) -> None:
        """Free the model's memory."""
        ...
