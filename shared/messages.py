"""Message contracts: one pydantic model per Kafka topic, shared by every service.

Every message carries `schema_version`; every message about a chat request also carries its
`request_id` (the registry's `ModelCard` is about a worker, not a request, so it has none).
Fields are only ever added (with defaults), never repurposed, so old consumers keep reading new
messages.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

SCHEMA_VERSION = 1


def new_request_id() -> str:
    """A fresh request id in the OpenAI style (`chatcmpl-...`)."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def utcnow() -> datetime:
    """Timezone-aware current time; every timestamp on the bus is UTC."""
    return datetime.now(UTC)


class Envelope(BaseModel):
    """Fields every message on the bus carries."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this schema.")
    request_id: str = Field(
        default_factory=new_request_id,
        min_length=1,
        max_length=128,
        description="Id of the chat request; also the completion id returned to the client.",
        examples=["chatcmpl-5f0c3c9e2d6b4c1e9a8f7d6c5b4a3f21"],
    )


class ChatMessage(BaseModel):
    """One turn of the conversation, as in OpenAI's chat API."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class ReplyRoute(BaseModel):
    """Where the answer to a request must be sent besides the results topic."""

    topic: str = Field(description="Reply topic, normally `autoglm.replies`.")
    partition: int = Field(ge=0, description="Partition owned by the waiting gateway instance.")


class ChatRequest(Envelope):
    """A chat completion request: topic `autoglm.requests` (gateway or any producer -> router)."""

    created_at: datetime = Field(default_factory=utcnow)
    deadline: datetime | None = Field(
        default=None, description="After this instant nobody waits for the answer; work is skipped."
    )
    model: str = Field(
        default="auto",
        min_length=1,
        description="`auto` (the router decides), a pool name, or a model id.",
        examples=["auto", "light", "tiny-heavy"],
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="A 64-bit integer.")
    user: str | None = Field(default=None, description="End-user id supplied by the client.")
    priority: int = Field(default=0, ge=0, le=9, description="Higher is more urgent.")
    caller: str | None = Field(default=None, description="Authenticated identity of the caller.")
    reply_to: ReplyRoute | None = Field(
        default=None, description="Set by a gateway that waits for the answer; producers omit it."
    )
    probe: bool = Field(
        default=False,
        description="Readiness probe: travels the whole path but runs no model and is not stored.",
    )
    stream: bool = Field(
        default=False,
        description="The caller reads the answer as it is generated: workers publish `ChatChunk`s to `reply_to`.",
    )
    prompt_format: Literal["chat", "text"] = Field(
        default="chat",
        description="`text` (`/v1/completions`): the one user message is a raw prompt, continued without the "
        "chat template.",
    )

    @model_validator(mode="after")
    def _last_message_is_not_from_assistant(self) -> ChatRequest:
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must come from the user or the system")
        if self.prompt_format == "text" and (len(self.messages) != 1 or self.messages[0].role != "user"):
            raise ValueError("a text prompt is exactly one user message")
        return self

    def is_expired(self, now: datetime | None = None) -> bool:
        """True when the deadline has passed."""
        return self.deadline is not None and (now or utcnow()) >= self.deadline


RoutingPolicy = Literal[
    "threshold", "explicit_model", "explicit_pool", "spill", "no_live_workers", "breaker_fallback", "pool_unavailable"
]


class RoutingExplanation(BaseModel):
    """Why the router chose a pool: the score, the policy that decided, and what each feature added."""

    policy: RoutingPolicy = Field(
        description="The rule that decided: `threshold` (score vs threshold), `explicit_model` / `explicit_pool` "
        "(named in the request), `spill` (a borderline request left a backlogged pool), `no_live_workers` (the "
        "scored pool had no live worker), `breaker_fallback` (its breaker was open), `pool_unavailable` (no pool).",
        examples=["threshold"],
    )
    score: float = Field(ge=0.0, le=1.0, description="Complexity score in [0, 1].")
    threshold: float = Field(ge=0.0, le=1.0, description="The score at or above which `auto` goes heavy.")
    contributions: dict[str, float] = Field(
        default_factory=dict, description="Each feature's contribution to the score.", examples=[{"length": 0.4}]
    )
    scored_pool: str | None = Field(default=None, description="The pool the score (or the request) asked for.")
    pool: str | None = Field(default=None, description="The pool chosen (None: none could take it).")
    lane: Literal["normal", "priority"] = Field(default="normal", description="`priority`: the priority topic.")
    notes: list[str] = Field(default_factory=list, description="What else the router saw (lag, breaker states).")


class RoutedJob(Envelope):
    """A request with the router's decision: topic `autoglm.jobs.<pool>` (router -> worker)."""

    request: ChatRequest
    pool: str
    model: str
    score: float = Field(ge=0.0, le=1.0, description="Complexity score in [0, 1].")
    reasons: list[str] = Field(default_factory=list, description="Why this pool was chosen.")
    routed_at: datetime = Field(default_factory=utcnow)
    routing: RoutingExplanation | None = Field(default=None, description="The router's explanation.")


class Usage(BaseModel):
    """Token counts, as in OpenAI's `usage` object."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Timings(BaseModel):
    """Where the request spent its time, in milliseconds."""

    queue_ms: float = Field(default=0.0, description="From creation until the worker took it.")
    inference_ms: float = Field(default=0.0, description="Model time of the batch it ran in.")
    total_ms: float = Field(default=0.0, description="From creation until the result was made.")
    batch_size: int = Field(default=1, description="Size of the batch the request ran in.")


class Choice(BaseModel):
    """One generated answer."""

    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length", "error", "cancelled"] = "stop"


class ErrorInfo(BaseModel):
    """Why a request failed, in OpenAI's error vocabulary."""

    type: str = Field(examples=["invalid_request_error", "timeout", "server_error"])
    message: str
    code: str | None = None


class ChatResult(Envelope):
    """The outcome of a request: topic `autoglm.results`, and the caller's reply route."""

    model: str | None = None
    pool: str | None = None
    score: float | None = None
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    error: ErrorInfo | None = None
    created_at: datetime = Field(description="When the request was created.")
    completed_at: datetime = Field(default_factory=utcnow)
    probe: bool = False
    attempts: int = Field(default=1, ge=1, description="Attempt of the worker that produced this result.")
    reasons: list[str] = Field(default_factory=list, description="Why the router chose this pool.")
    routing: RoutingExplanation | None = Field(default=None, description="The router's explanation of its choice.")

    @property
    def ok(self) -> bool:
        """True when the request produced an answer."""
        return self.error is None


class DeadLetter(Envelope):
    """A message no service could process: topic `autoglm.deadletter`."""

    request_id: str | None = None  # type: ignore[assignment]  # unknown when the payload is garbage
    source_topic: str
    service: str
    error_type: str
    reason: str
    attempts: int = 1
    payload: str = Field(description="The original message body, decoded as UTF-8 with escapes.")
    failed_at: datetime = Field(default_factory=utcnow)


class TensorSpec(BaseModel):
    """One named input or output of a model: what a caller sends or gets back, KServe-style."""

    name: str = Field(examples=["messages", "choices"])
    dtype: str = Field(description="Element type; `chat_message` = JSON `{role, content}` with UTF-8 text.")
    shape: list[int] = Field(description="Dimensions; -1 = variable.", examples=[[-1], [1]])
    description: str = ""


class ModelCard(BaseModel):
    """A worker's live model: topic `autoglm.registry`, key `<instance_id>/<model_id>` (compacted).

    Not an `Envelope`: a card describes a worker process, not a chat request, so a `request_id` would
    be a random id that means nothing. It carries `schema_version` like every message. A worker
    republishes its cards every few seconds (`heartbeat_at`); a card whose heartbeat is older than
    `ttl_s` is stale, and a record with the same key and a null value (a tombstone) withdraws it.
    """

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this schema.")
    model_id: str = Field(min_length=1, examples=["tiny-light"])
    version: str = Field(default="1", description="Model version from the deployment file.")
    pool: str = Field(min_length=1, examples=["light"])
    backend: str = Field(examples=["torch", "openai", "triton", "tensorrt"])
    framework: str = Field(description="Engine and its version.", examples=["transformers-4.57.1"])
    precision: str = Field(description="Weights' dtype as loaded.", examples=["float32", "float16"])
    device: str = Field(examples=["cpu", "cuda:0"])
    max_batch_size: int = Field(ge=1, description="Most requests one batch of this worker holds.")
    max_context_tokens: int = Field(ge=1, description="Prompt plus completion, in tokens.")
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    instance_id: str = Field(min_length=1, description="Worker process: host, pid and a random suffix.")
    started_at: datetime = Field(description="When the worker process started serving.")
    heartbeat_at: datetime = Field(default_factory=utcnow, description="When this card was published.")
    ttl_s: float = Field(default=30.0, gt=0, description="The card is stale this long after its heartbeat.")
    status: Literal["serving", "draining"] = Field(
        default="serving", description="`draining`: finishing its work before leaving; takes no new work."
    )

    @property
    def key(self) -> str:
        """The record key: one card per worker instance and model."""
        return f"{self.instance_id}/{self.model_id}"


class CancelRequest(Envelope):
    """Cancel a queued request: topic `autoglm.control`. Routers and workers skip it from then on."""

    reason: str = Field(default="cancelled by the client", max_length=500)
    requested_by: str | None = Field(default=None, description="Identity of whoever cancelled it.")
    created_at: datetime = Field(default_factory=utcnow)


class ChatChunk(Envelope):
    """A piece of a streamed answer: the caller's reply route only, before the request's `ChatResult`.

    One run of a request (`stream_id`) numbers its chunks from 0; a retried or redelivered request
    streams again under a new `stream_id`. The final `ChatResult` holds the whole text, so a chunk that
    is lost costs a client only smoothness, never text.
    """

    stream_id: str = Field(min_length=1, description="One run of the request on a worker.")
    seq: int = Field(ge=0, description="Position of this chunk within its run.")
    delta: str = Field(description="Text generated since the previous chunk.")
    model: str | None = None


def reply_kind(value: Any) -> str:
    """Tells the two messages on a reply partition apart: only a chunk has a `delta`."""
    if isinstance(value, dict):
        return "chunk" if "delta" in value else "result"
    return "chunk" if isinstance(value, ChatChunk) else "result"


Reply = Annotated[Annotated[ChatResult, Tag("result")] | Annotated[ChatChunk, Tag("chunk")], Discriminator(reply_kind)]
"""What a gateway reads from its reply partition: `ChatChunk`s of streamed requests, then `ChatResult`s."""


def new_feedback_id() -> str:
    """A fresh feedback id."""
    return f"fb-{uuid.uuid4().hex}"


class Feedback(Envelope):
    """A client's judgement of a completion: topic `autoglm.feedback` (gateway -> exporter)."""

    request_id: str = Field(  # type: ignore[assignment]  # required: feedback is always about a request
        min_length=1, max_length=128, description="The completion being judged."
    )
    feedback_id: str = Field(default_factory=new_feedback_id, min_length=1, max_length=64)
    score: float = Field(ge=-1.0, le=1.0, description="-1 is thumbs down, 1 thumbs up; anything between.")
    comment: str | None = Field(default=None, max_length=2000)
    caller: str | None = Field(default=None, description="Authenticated identity of whoever sent it.")
    created_at: datetime = Field(default_factory=utcnow)
