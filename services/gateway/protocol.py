"""OpenAI-compatible request and response models of the gateway's HTTP API."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from shared.messages import ChatMessage, ChatRequest, ChatResult, Choice, ReplyRoute, Usage


class StreamOptions(BaseModel):
    """`stream_options`: what a streamed answer carries besides the text."""

    model_config = ConfigDict(extra="forbid", strict=True)  # e.g. `stream: 0` is a 400, not False

    include_usage: bool = Field(default=False, description="Send a last chunk with `usage` and no choices.")


class GenerationParams(BaseModel):
    """Fields both completion endpoints share. Unknown fields are refused, never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)  # e.g. `stream: 0` is a 400, not False

    model: str = Field(default="auto", min_length=1, examples=["auto"])
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end the answer.")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="A 64-bit integer.")
    n: Literal[1] = 1
    user: str | None = Field(default=None, max_length=200)
    stream: bool = Field(default=False, description="Answer with server-sent events as the text is generated.")
    stream_options: StreamOptions | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop strings")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def prompt(self) -> tuple[list[ChatMessage], Literal["chat", "text"]]:
        """The conversation the model sees, and its format."""
        raise NotImplementedError

    def output_limit(self) -> int | None:
        return self.max_tokens

    def to_chat_request(self, request_id: str, deadline: datetime, reply_to: ReplyRoute | None) -> ChatRequest:
        """The bus message for this HTTP request."""
        messages, prompt_format = self.prompt()
        return ChatRequest(
            request_id=request_id,
            model=self.model,
            messages=messages,
            prompt_format=prompt_format,
            max_tokens=self.output_limit(),
            temperature=self.temperature,
            top_p=self.top_p,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            seed=self.seed,
            user=self.user,
            stream=self.stream,
            deadline=deadline,
            reply_to=reply_to,
        )


class ChatCompletionRequest(GenerationParams):
    """`POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)

    def prompt(self) -> tuple[list[ChatMessage], Literal["chat", "text"]]:
        return self.messages, "chat"

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


PromptText = Annotated[str, Field(min_length=1, max_length=1_000_000)]


class CompletionRequest(GenerationParams):
    """`POST /v1/completions` body: a raw prompt the model continues (no chat template)."""

    prompt_text: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        alias="prompt", description="The text to continue; a list must hold exactly one string (n=1)."
    )
    max_tokens: int | None = Field(default=16, ge=1, le=32_768)  # OpenAI's default for this endpoint

    def prompt(self) -> tuple[list[ChatMessage], Literal["chat", "text"]]:
        text = self.prompt_text if isinstance(self.prompt_text, str) else self.prompt_text[0]
        return [ChatMessage(role="user", content=text)], "text"


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


class TextChoice(BaseModel):
    """One generated continuation of `/v1/completions`."""

    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length", "error", "cancelled"] | None = "stop"


class TextCompletionResponse(BaseModel):
    """A text completion, shaped as OpenAI's."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage

    @classmethod
    def from_result(cls, result: ChatResult) -> TextCompletionResponse:
        choices = [
            TextChoice(text=c.message.content, index=c.index, finish_reason=c.finish_reason) for c in result.choices
        ]
        return cls(
            id=result.request_id,
            created=int(result.created_at.timestamp()),
            model=result.model or "unknown",
            choices=choices,
            usage=result.usage,
        )


class ChunkDelta(BaseModel):
    """What a chat chunk adds to the answer."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length", "error", "cancelled"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`data: {...}`; the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(default=None, description="Only on the last chunk, with include_usage.")


class TextCompletionChunk(BaseModel):
    """One server-sent event of a streamed text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


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
