"""The OpenAI backend: a pool that fronts any OpenAI-compatible server (vLLM, TGI, SGLang, a hosted
API, or another Open-AutoGLM gateway).

How a batch runs: every request becomes its own `POST {endpoint}/chat/completions` (`/completions` for
a text prompt; streamed when its caller streams), all sent at once over one pooled HTTP client with as
many connections as the pool's `max_batch_size`. Batching happens upstream (vLLM, TGI and SGLang batch
continuously), so the worker's batch only sets the concurrency.

What goes wrong, per request or per batch:
- HTTP 400, 404, 413 or 422 means the server refused that request (an unknown upstream model, a prompt
  too long, a bad parameter): it gets an error output of its own with the server's message, and its
  batch companions keep their answers.
- Anything else (a timeout, a connection error, 429, 5xx, another status, an unreadable body) is the
  server's problem and may pass. The worker's contract (`execution.run_on_model`) has no per-request
  "retry me" output: a raised exception means "retry every job of this model's sub-batch". So the first
  such failure cancels the calls still in flight and raises `TransientBackendError`; the whole
  sub-batch goes to the retry topic, and companions already answered run again upstream on the next
  attempt (at most `retries.max_attempts` in all).
- `timeout_s` bounds each call from the moment it waits for a pooled connection to the last byte
  of the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.worker.backends.base import (
    BackendInfo,
    DeltaSink,
    GenerationInput,
    GenerationOutput,
    PermanentBackendError,
    TransientBackendError,
)
from shared.settings import ModelConfig

logger = logging.getLogger(__name__)

REFUSED_STATUSES = frozenset({400, 404, 413, 422})
"""Statuses that mean "this request is bad": answered with an error, never retried."""

MAX_ERROR_CHARS = 2000


class OpenAIBackend:
    """A model served by an OpenAI-compatible endpoint; implements `base.Backend` over httpx."""

    def __init__(
        self,
        model_id: str,
        endpoint: str,
        *,
        upstream_model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_connections: int = 32,
        precision: str = "auto",
    ) -> None:
        self.model_id = model_id
        self.upstream_model = upstream_model or model_id
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.precision = precision
        # Error messages reach callers (retries_exhausted results): name the model, not the internal URL.
        self.where = f"the endpoint of {model_id}"
        url = httpx.URL(self.endpoint)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"model {model_id!r}: endpoint {endpoint!r} is not an http(s) URL")
        headers = {"User-Agent": "open-autoglm-worker"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Created here (possibly in a loader thread): httpx binds its connections to an event loop
        # only when the first request is sent.
        self.client = httpx.AsyncClient(
            base_url=self.endpoint + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, model: ModelConfig, *, max_connections: int) -> OpenAIBackend:
        """A backend for a model of an `openai` pool; fails at start when its API key is missing."""
        if model.endpoint is None:
            raise ValueError(f"model {model.id!r}: the openai backend needs `endpoint`")
        logger.info("model %s is %s at %s", model.id, model.upstream_model or model.id, model.endpoint)
        return cls(
            model.id,
            model.endpoint,
            upstream_model=model.upstream_model,
            api_key=api_key_for(model),
            timeout_s=model.timeout_s,
            max_connections=max_connections,
            precision=model.precision,
        )

    # --------------------------------------------------------------- generation

    async def agenerate(
        self, batch: list[GenerationInput], on_delta: DeltaSink | None = None
    ) -> list[GenerationOutput]:
        """One concurrent call per request; output order = input order (see the module docstring for errors)."""
        self._require_open()
        if not batch:
            return []
        calls = [
            asyncio.create_task(
                self._complete_streaming(request, on_delta) if on_delta and request.stream else self._complete(request)
            )
            for request in batch
        ]
        try:
            await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # After a failure (or if we are cancelled) the rest would only be thrown away: stop them.
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        failures = [error for call in calls if not call.cancelled() and (error := call.exception()) is not None]
        if failures:
            raise batch_failure(failures, len(batch))
        return [call.result() for call in calls]

    async def _complete(self, request: GenerationInput) -> GenerationOutput:
        """One chat completion: an output (maybe an error output), or TransientBackendError."""
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.post(api_path(request), json=self.request_body(request))
        except (TimeoutError, httpx.TimeoutException) as error:
            raise TransientBackendError(f"no answer from {self.where} within {self.timeout_s:g} s") from error
        except httpx.RequestError as error:
            raise TransientBackendError(f"{self.where} unreachable: {type(error).__name__}: {error}") from error
        if response.status_code in REFUSED_STATUSES:
            return refused_output(request, server_message(response))
        if not response.is_success:
            raise TransientBackendError(
                f"{self.where} answered HTTP {response.status_code}: {server_message(response)}"
            )
        try:
            return completion_output(request, response.json())
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise TransientBackendError(
                f"{self.where} answered HTTP {response.status_code} with no readable completion: {error!r}"
            ) from error

    async def _complete_streaming(self, request: GenerationInput, on_delta: DeltaSink) -> GenerationOutput:
        """One streamed completion: each delta goes to `on_delta` as it arrives; the output holds them all."""
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish_reason = None
        try:
            async for chunk in self._stream_chunks(request):
                if text := chunk_text(chunk):
                    pieces.append(text)
                    on_delta(request.request_id, text)
                usage = chunk.get("usage") or usage
                finish_reason = chunk_finish_reason(chunk) or finish_reason
        except PermanentBackendError as error:
            return refused_output(request, str(error))
        return GenerationOutput(
            request_id=request.request_id,
            text="".join(pieces),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if finish_reason == "length" else "stop",
        )

    def request_body(self, request: GenerationInput) -> dict[str, Any]:
        """The completion request; optional fields only when set (some servers refuse nulls)."""
        prompt: dict[str, Any] = (
            {"prompt": request.messages[0].content}
            if request.prompt_format == "text"
            else {"messages": [{"role": message.role, "content": message.content} for message in request.messages]}
        )
        body: dict[str, Any] = {
            "model": self.upstream_model,
            **prompt,
            # `max_tokens` rather than `max_completion_tokens`: every compatible server reads it.
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    # ---------------------------------------------------------------- streaming

    async def astream(self, request: GenerationInput) -> AsyncIterator[str]:
        """The answer's text deltas as the upstream streams them (`stream: true`, server-sent events).

        A refusal (400, 404, 413, 422) raises PermanentBackendError, any other failure
        TransientBackendError; a failure after the first delta leaves what was yielded in the caller's
        hands. `timeout_s` bounds each wait for the next chunk here, not the whole stream.
        """
        async for chunk in self._stream_chunks(request):
            if text := chunk_text(chunk):
                yield text

    async def _stream_chunks(self, request: GenerationInput) -> AsyncIterator[dict[str, Any]]:
        """The parsed chunks of a streamed completion, up to `[DONE]`; failures as `astream` says."""
        self._require_open()
        body = {**self.request_body(request), "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with self.client.stream("POST", api_path(request), json=body) as response:
                if not response.is_success:
                    await response.aread()
                    raise stream_refusal(self.where, response)
                async for data in sse_data(response.aiter_lines()):
                    if data.strip() == "[DONE]":
                        return
                    yield parse_chunk(data)
        except httpx.TimeoutException as error:
            raise TransientBackendError(f"{self.where} stopped streaming for {self.timeout_s:g} s") from error
        except httpx.RequestError as error:
            raise TransientBackendError(f"{self.where} stream failed: {type(error).__name__}: {error}") from error

    # ------------------------------------------------------------ registry, closing

    def info(self) -> BackendInfo:
        """Registry metadata. The endpoint stays out: `GET /v1/models` shows the device to every client."""
        return BackendInfo(
            backend="openai",
            framework=f"httpx-{httpx.__version__}",
            device="remote",
            precision="upstream" if self.precision == "auto" else self.precision,
            max_batch_size=None,  # no limit of its own: the upstream batches as it sees fit
        )

    @property
    def closed(self) -> bool:
        return self._closed or self.client.is_closed

    def _require_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"backend for {self.model_id} is closed")

    def close(self) -> None:
        """Release the connection pool (the protocol's close is synchronous: it schedules `aclose`).

        Connections belong to the event loop that opened them, so they are closed on the running loop;
        without one there is no loop left to close them on and the OS reclaims the sockets at exit.
        """
        if self.closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # no running loop: none to close the connections on
            self._closing = asyncio.get_running_loop().create_task(self.client.aclose())
        logger.info("closed model %s", self.model_id)

    async def aclose(self) -> None:
        """Close the connection pool and wait until it is closed."""
        self._closed = True
        if self._closing is not None:
            await self._closing
        else:
            await self.client.aclose()  # idempotent


def api_key_for(model: ModelConfig) -> str | None:
    """The key from the env var the model names; a named but unset variable stops the worker at start."""
    if model.api_key_env is None:
        return None
    key = os.environ.get(model.api_key_env, "")
    if not key:
        raise ValueError(f"model {model.id!r}: api_key_env names {model.api_key_env}, which is not set")
    return key


def batch_failure(failures: list[BaseException], batch_size: int) -> BaseException:
    """What the batch raises: the transient failure, counted, or an unexpected error as it is."""
    first = failures[0]
    if not isinstance(first, TransientBackendError):
        return first
    if len(failures) == 1 and batch_size == 1:
        return first
    error = TransientBackendError(f"{len(failures)} of {batch_size} calls failed, first: {first}")
    error.__cause__ = first
    return error


def refused_output(request: GenerationInput, message: str) -> GenerationOutput:
    """The error output of a request the server refused."""
    return GenerationOutput(
        request_id=request.request_id,
        text="",
        prompt_tokens=0,
        completion_tokens=0,
        finish_reason="error",
        error=message,
        error_code="rejected_by_upstream",
    )


def completion_output(request: GenerationInput, body: Any) -> GenerationOutput:
    """A (chat) completion body as an output; servers that omit usage count as 0 tokens."""
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    return GenerationOutput(
        request_id=request.request_id,
        text=(choice["message"].get("content") if "message" in choice else choice["text"]) or "",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        # "length" is the only reason that means cut short; stop, eos, tool_calls, content_filter end the turn.
        finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
    )


def server_message(response: httpx.Response) -> str:
    """The error message of a failed call, whichever server dialect it is in."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        # OpenAI / vLLM / our gateway: {"error": {"message"}}; TGI: {"error": "..."}; FastAPI: {"detail"}.
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
    if not message:
        message = response.text.strip() or response.reason_phrase
    text = message if isinstance(message, str) else json.dumps(message)
    return text[:MAX_ERROR_CHARS]


def stream_refusal(where: str, response: httpx.Response) -> Exception:
    """The error for a stream the server did not start."""
    message = f"{where} answered HTTP {response.status_code}: {server_message(response)}"
    if response.status_code in REFUSED_STATUSES:
        return PermanentBackendError(message)
    return TransientBackendError(message)


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event (several data lines join with newlines; other fields are skipped)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line.removeprefix("data:")
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def api_path(request: GenerationInput) -> str:
    """The upstream route: chat completions, or plain completions for a text prompt."""
    return "completions" if request.prompt_format == "text" else "chat/completions"


def parse_chunk(data: str) -> dict[str, Any]:
    """One streamed chunk as JSON; an unreadable chunk or an error event raises TransientBackendError."""
    try:
        chunk = json.loads(data)
    except ValueError as error:
        raise TransientBackendError(f"unreadable stream chunk: {data[:200]!r}") from error
    if not isinstance(chunk, dict):
        raise TransientBackendError(f"unreadable stream chunk: {data[:200]!r}")
    if "error" in chunk:  # vLLM reports a failure mid-stream as an error event
        problem = chunk["error"]
        message = problem.get("message") if isinstance(problem, dict) else problem
        raise TransientBackendError(f"the stream broke off: {message}")
    return chunk


def first_choice(chunk: dict[str, Any]) -> dict[str, Any]:
    choices = chunk.get("choices") or []
    return choices[0] if choices and isinstance(choices[0], dict) else {}  # none: e.g. the usage-only chunk


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text of one chunk: a chat delta's content or a text completion's text ("" for role-only chunks)."""
    choice = first_choice(chunk)
    content = (choice.get("delta") or {}).get("content", choice.get("text"))
    return content if isinstance(content, str) else ""


def chunk_finish_reason(chunk: dict[str, Any]) -> str | None:
    reason = first_choice(chunk).get("finish_reason")
    return reason if isinstance(reason, str) else None
