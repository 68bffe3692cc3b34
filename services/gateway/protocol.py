"""OpenAI-compatible request and response models of the gateway's HTTP API."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import ChatMessage, ChatRequest, ChatResult, Choice, ReplyRoute, Usage


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` body. Unknown fields are refused, never silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="auto", min_length=1, examples=["auto"])
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    user: str | None = Field(default=None, max_length=200)
    stream: Literal[False] = Field(default=False, description="Streaming is not supported yet.")

    def to_chat_request(self, request_id: str, deadline: datetime, reply_to: ReplyRoute | None) -> ChatRequest:
        """The bus message for this HTTP request."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return ChatRequest(
            request_id=request_id,
            model=self.model,
            messages=self.messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            user=self.user,
            deadline=deadline,
            reply_to=reply_to,
        )


class ChatCompletionResponse(BaseModel):
    """A chat completion, shaped as OpenAI's."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage

    @classmethod
    def from_result(cls, result: ChatResult) -> ChatCompletionResponse:
        """Build the HTTP answer from a successful result."""
        return cls(
            id=result.request_id,
            created=int(result.created_at.timestamp()),
            model=result.model or "unknown",
            choices=result.choices,
            usage=result.usage,
        )


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`: OpenAI's model object; our extra fields are left out when unknown."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "autoglm"
    pool: str | None = Field(default=None, description="Pool serving this model (a pool's own entry: itself).")
    backend: str | None = Field(default=None, examples=["torch"])
    version: str | None = None
    precision: str | None = Field(default=None, description="Only from the registry: as loaded by a worker.")
    device: str | None = Field(default=None, description="Only from the registry.")
    max_context_tokens: int | None = None
    instances: int | None = Field(default=None, description="Only from the registry: live workers serving it.")


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class CancellationResponse(BaseModel):
    """`POST /v1/requests/{id}/cancel`: the cancellation is on its way to every router and worker."""

    id: str
    object: Literal["request.cancellation"] = "request.cancellation"
    status: Literal["cancelling"] = "cancelling"


class ErrorInfo(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: `{"error": {...}}`."""

    error: ErrorInfo
