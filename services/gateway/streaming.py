"""Streamed answers: chunks from the worker become OpenAI server-sent events.

A streamed request's chunks and then its result arrive on this gateway's reply partition. The text a
client sees only ever grows: a retried or redelivered request streams again under a new `stream_id`,
and its text is shown only past what the client already has (and only if it agrees with it). The
final result holds the whole text, so whatever the chunks missed (a backend that cannot stream, a lost
chunk) is sent before the finishing event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypedDict

from services.gateway.errors import ApiError, error_from_result
from services.gateway.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    ErrorInfo,
    ErrorResponse,
    TextChoice,
    TextCompletionChunk,
)
from shared.messages import ChatChunk, ChatResult, Reply, Usage

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


class StreamAssembler:
    """The text shown so far, grown from the chunks of however many runs of the request."""

    def __init__(self) -> None:
        self.shown = ""
        self.runs: dict[str, tuple[int, str]] = {}  # stream_id -> (next seq, text so far)

    def add(self, chunk: ChatChunk) -> str:
        """New text to send for this chunk ("" for a duplicate, a gap, or a run that disagrees)."""
        expected, text = self.runs.get(chunk.stream_id, (0, ""))
        if chunk.seq != expected:
            return ""  # a redelivered chunk, or one after a lost one: the result fills the gap
        text += chunk.delta
        self.runs[chunk.stream_id] = (expected + 1, text)
        return self._grow_to(text)

    def finish(self, result: ChatResult) -> str:
        """The final text's part the client has not seen yet."""
        final = result.choices[0].message.content if result.choices else ""
        if not final.startswith(self.shown):
            logger.warning("streamed text of %s disagrees with its result; the stored result holds the final text",
                           result.request_id)  # fmt: skip
            return ""
        return self._grow_to(final)

    def _grow_to(self, text: str) -> str:
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown) :], text
        return delta


class ReplyStream:
    """One streamed request's replies, read until its result; closing it early cancels the request."""

    def __init__(
        self,
        request_id: str,
        replies: asyncio.Queue[Reply],
        deadline: float,
        on_close: Callable[[ReplyStream], None],
    ) -> None:
        self.request_id = request_id
        self.replies = replies
        self.deadline = deadline  # event-loop time
        self.on_close = on_close
        self.assembler = StreamAssembler()
        self.first: Reply | None = None
        self.result: ChatResult | None = None
        self.model: str | None = None
        self.closed = False

    async def next_reply(self) -> Reply:
        """The next chunk or the result; ApiError 504 once the deadline passes."""
        if self.first is not None:
            reply, self.first = self.first, None
            return reply
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self.replies.get(), max(remaining, 0))
        except TimeoutError:
            raise ApiError(504, "The request did not complete in time", "timeout", None, "deadline_exceeded") from None

    async def start(self) -> None:
        """Wait for the first reply: a request that fails before any text fails as plain HTTP."""
        self.first = await self.next_reply()
        self.model = self.first.model
        if isinstance(self.first, ChatResult) and self.first.error is not None:
            raise error_from_result(self.first)

    async def texts(self) -> AsyncIterator[str]:
        """Text as it arrives; afterwards `result` holds the request's result."""
        while self.result is None:
            reply = await self.next_reply()
            self.model = self.model or reply.model
            if isinstance(reply, ChatChunk):
                text = self.assembler.add(reply)
            else:
                self.result = reply
                text = self.assembler.finish(reply) if reply.error is None else ""
            if text:
                yield text

    def close(self) -> None:
        """Stop reading (once, however often it is called): forget the request, cancel it if unfinished."""
        if not self.closed:
            self.closed = True
            self.on_close(self)


class ChunkIds(TypedDict):
    """What every chunk of one answer repeats."""

    id: str
    created: int


class ChunkFormat(Protocol):
    """How one endpoint shapes its chunks."""

    def opening(self) -> dict[str, Any] | None: ...
    def text(self, text: str) -> dict[str, Any]: ...
    def finish(self, reason: str) -> dict[str, Any]: ...
    def usage(self, usage: Usage) -> dict[str, Any]: ...


class ChatChunks:
    """`chat.completion.chunk` events: the role first, then content deltas, then the finish reason."""

    def __init__(self, request_id: str, created: int, stream: ReplyStream) -> None:
        self.ids = ChunkIds(id=request_id, created=created)
        self.stream = stream

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
        model = self.stream.model or "unknown"
        return ChatCompletionChunk(**self.ids, model=model, choices=choices, usage=usage).model_dump()

    def opening(self) -> dict[str, Any] | None:
        return self._chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])

    def text(self, text: str) -> dict[str, Any]:
        return self._chunk([ChunkChoice(delta=ChunkDelta(content=text))])

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk([ChunkChoice(delta=ChunkDelta(), finish_reason=reason)])  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._chunk([], usage)


class TextChunks:
    """`text_completion` events of a streamed `/v1/completions`."""

    def __init__(self, request_id: str, created: int, stream: ReplyStream) -> None:
        self.ids = ChunkIds(id=request_id, created=created)
        self.stream = stream

    def _chunk(self, choices: list[TextChoice], usage: Usage | None = None) -> dict[str, Any]:
        model = self.stream.model or "unknown"
        return TextCompletionChunk(**self.ids, model=model, choices=choices, usage=usage).model_dump()

    def opening(self) -> dict[str, Any] | None:
        return None

    def text(self, text: str) -> dict[str, Any]:
        return self._chunk([TextChoice(text=text, finish_reason=None)])

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk([TextChoice(text="", finish_reason=reason)])  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._chunk([], usage)


def event(data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def server_sent_events(stream: ReplyStream, chunks: ChunkFormat, include_usage: bool) -> AsyncIterator[bytes]:
    """The whole SSE body: text as it comes, the finish reason, usage if asked, then `[DONE]`.

    A failure after the first byte can only be told inside the stream: an `error` event, as OpenAI
    sends (its SDKs raise it), then `[DONE]`.
    """
    try:
        if (opening := chunks.opening()) is not None:
            yield event(opening)
        try:
            async for text in stream.texts():
                yield event(chunks.text(text))
        except ApiError as error:
            yield event(ErrorResponse(error=error.info).model_dump())
            yield DONE
            return
        result = stream.result
        assert result is not None
        if result.error is not None:
            info = ErrorInfo(message=result.error.message, type=result.error.type, code=result.error.code)
            yield event(ErrorResponse(error=info).model_dump())
        else:
            yield event(chunks.finish(result.choices[0].finish_reason if result.choices else "stop"))
            if include_usage:
                yield event(chunks.usage(result.usage))
        yield DONE
    finally:
        stream.close()
