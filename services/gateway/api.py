"""HTTP routes: thin translations between OpenAI's API and the chat service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.background import BackgroundTask

from services.gateway.auth import ChatCaller, FeedbackCaller, ModelsReader, Principal, RequestsCaller
from services.gateway.dependencies import from_state
from services.gateway.errors import ApiError, error_from_result
from services.gateway.feedback import FeedbackReceipt, FeedbackRequest, send_feedback
from services.gateway.idempotency import REPLAYED_HEADER, IdempotentCompletions, Outcome
from services.gateway.limits import Admission
from services.gateway.models import find_model, list_models
from services.gateway.protocol import (
    CancellationResponse,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    ErrorResponse,
    GenerationParams,
    ModelCard,
    ModelList,
    TextCompletionChunk,
    TextCompletionResponse,
)
from services.gateway.serving import ChatService
from services.gateway.streaming import ChatChunks, ChunkFormat, ReplyStream, TextChunks, server_sent_events
from services.gateway.tracking import RequestAccepted, RequestStatus, fetch_request, request_status, state_of
from shared.db import storable
from shared.registry import RegistryView


@dataclass(frozen=True)
class Completions:
    """What answering a completion takes: the chat service, the idempotent runner and the limits."""

    chat: ChatService
    idempotent: IdempotentCompletions
    admission: Admission


def get_completions(request: Request) -> Completions:
    state = request.app.state
    return Completions(state.chat, state.idempotent, state.admission)


ChatServiceDep = Annotated[ChatService, Depends(from_state("chat", ChatService))]
RegistryDep = Annotated[RegistryView, Depends(from_state("registry", RegistryView))]
EngineDep = Annotated[AsyncEngine, Depends(from_state("engine", AsyncEngine))]
CompletionsDep = Annotated[Completions, Depends(get_completions)]
PreferHeader = Annotated[str | None, Header(description="`respond-async`: answer 202 at once, poll the request.")]
KeyHeader = Annotated[
    str | None,
    Header(description="A retried POST with the same key runs once.", pattern=r"^[ -~]{1,255}$"),  # printable ASCII
]
CacheControl = Annotated[
    str | None, Header(description="`no-cache` (or `no-store`) bypasses the response cache for this request.")
]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 500, 503, 504)}
CACHE_HEADER = "X-AutoGLM-Cache"

router = APIRouter(prefix="/v1", responses=ERRORS)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Delivery:
    """How the client wants its answer, from the request's headers."""

    cache_control: str | None
    prefer: str | None
    idempotency_key: str | None

    @property
    def wait(self) -> bool:
        """False when the Prefer header (RFC 7240) asks for `respond-async`."""
        preferences = (self.prefer or "").split(",")
        return not any(preference.split(";")[0].strip().lower() == "respond-async" for preference in preferences)

    @property
    def bypass_cache(self) -> bool:
        return any(word in (self.cache_control or "") for word in ("no-cache", "no-store"))


def delivery(
    prefer: PreferHeader = None, idempotency_key: KeyHeader = None, cache_control: CacheControl = None
) -> Delivery:
    return Delivery(cache_control, prefer, idempotency_key)


DeliveryDep = Annotated[Delivery, Depends(delivery)]


def answer_docs(chunk: type) -> dict[int | str, dict[str, object]]:
    """OpenAPI: a 200 is JSON, or server-sent events of `chunk` objects with `stream: true`; 202 in async mode.

    The event stream's schema describes one event (as OpenAPI 3.2's `itemSchema` does).
    """
    data = {
        "type": "string",
        "contentMediaType": "application/json",
        "description": f"A {chunk.__name__} as JSON, an `error` object, or `[DONE]` (the last event).",
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}
    return {200: {"content": {"text/event-stream": {"schema": event}}}, 202: {"model": RequestAccepted}}


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=answer_docs(ChatCompletionChunk),  # type: ignore[arg-type]
)
async def create_chat_completion(
    body: ChatCompletionRequest, completions: CompletionsDep, caller: ChatCaller, how: DeliveryDep
) -> Response:
    """Create a chat completion (OpenAI-compatible): JSON, server-sent events with `stream: true`, or 202
    at once with `Prefer: respond-async`."""
    return await answer(
        body, completions=completions, caller=caller, how=how,
        response_type=ChatCompletionResponse, chunk_format=ChatChunks,
    )  # fmt: skip


@router.post(
    "/completions",
    response_model=TextCompletionResponse,
    responses=answer_docs(TextCompletionChunk),  # type: ignore[arg-type]
)
async def create_completion(
    body: CompletionRequest, completions: CompletionsDep, caller: ChatCaller, how: DeliveryDep
) -> Response:
    """Continue a prompt (OpenAI's legacy completions): no chat template is applied."""
    return await answer(
        body, completions=completions, caller=caller, how=how,
        response_type=TextCompletionResponse, chunk_format=TextChunks,
    )  # fmt: skip


async def answer(
    body: GenerationParams,
    *,
    completions: Completions,
    caller: Principal,
    how: Delivery,
    response_type: type[ChatCompletionResponse | TextCompletionResponse],
    chunk_format: type[ChatChunks | TextChunks],
) -> Response:
    """Admit the request (bounds, rates, in-flight cap), then answer it as the client asked."""
    if body.stream and (how.idempotency_key is not None or not how.wait):
        raise ApiError(
            400, "stream cannot be combined with an Idempotency-Key or Prefer: respond-async",
            "invalid_request_error", "stream", "unsupported_combination",
        )  # fmt: skip
    release = await completions.admission.acquire(caller, body)
    try:
        return await respond(body, completions, caller.key_id, how, response_type, chunk_format, release)
    finally:
        if not body.stream:
            release()


async def respond(  # noqa: PLR0917  # the pieces of one answer, passed on from `answer`
    body: GenerationParams,
    completions: Completions,
    caller: str,
    how: Delivery,
    response_type: type[ChatCompletionResponse | TextCompletionResponse],
    chunk_format: type[ChatChunks | TextChunks],
    release: Callable[[], None],
) -> Response:
    """Run the request once (idempotency key), from the cache, or end to end."""
    chat, headers = completions.chat, {}
    if how.idempotency_key is not None:
        outcome = await completions.idempotent.run(body, how.idempotency_key, caller, wait=how.wait)
    elif not how.wait:
        request = chat.build_request(body, wait=False, caller=caller)
        await chat.submit(request)
        outcome = Outcome(request.request_id, request.created_at, None, replayed=False)
    else:
        request = chat.build_request(body, wait=True, caller=caller)
        lookup = chat.look_up(request, bypass=how.bypass_cache)
        headers[CACHE_HEADER] = lookup.status
        if body.stream:
            try:
                stream = await chat.open_stream(request, lookup)
            except BaseException:
                release()
                raise
            chunks: ChunkFormat = chunk_format(stream.request_id, int(request.created_at.timestamp()), stream)
            return event_stream(stream, chunks, body.include_usage, headers, release)
        result = await chat.complete(request, lookup)
        outcome = Outcome(result.request_id, result.created_at, result, replayed=False)
    if outcome.replayed:
        headers[REPLAYED_HEADER] = "true"
    if not how.wait:
        return accepted(outcome, headers)
    assert outcome.result is not None  # waiting always ends in a result or an ApiError
    if outcome.result.error is not None:
        raise error_from_result(outcome.result)
    return JSONResponse(response_type.from_result(outcome.result).model_dump(mode="json"), headers=headers)


def event_stream(
    stream: ReplyStream, chunks: ChunkFormat, include_usage: bool, headers: dict[str, str], release: Callable[[], None]
) -> Response:
    """The SSE response; closing the stream and freeing its in-flight slot also happen if the client left early."""

    def finished() -> None:
        stream.close()
        release()

    return StreamingResponse(
        server_sent_events(stream, chunks, include_usage),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies must not buffer it
        background=BackgroundTask(finished),
    )


def accepted(outcome: Outcome, headers: dict[str, str]) -> JSONResponse:
    """202: the request is queued (or was already there); poll its Location."""
    body = RequestAccepted(
        id=outcome.request_id, status=state_of(outcome.result), created=int(outcome.created_at.timestamp())
    )
    headers = {**headers, "Location": f"/v1/requests/{outcome.request_id}", "Preference-Applied": "respond-async"}
    return JSONResponse(body.model_dump(), status_code=202, headers=headers)


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)
async def get_models(chat: ChatServiceDep, registry: RegistryDep, caller: ModelsReader) -> ModelList:
    """Models that can be requested: `auto`, each pool and each model that a live worker serves."""
    return ModelList(data=list_models(chat.settings, registry))


@router.get("/models/{model_id}", response_model=ModelCard, response_model_exclude_none=True)
async def get_model(model_id: str, chat: ChatServiceDep, registry: RegistryDep, caller: ModelsReader) -> ModelCard:
    """One entry of the list; an OpenAI 404 when it is not there."""
    model = find_model(chat.settings, registry, model_id)
    if model is None:
        raise ApiError(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    return model


@router.post("/requests/{request_id}/cancel", status_code=202, response_model=CancellationResponse)
async def cancel_request(
    request_id: str, chat: ChatServiceDep, engine: EngineDep, caller: RequestsCaller
) -> CancellationResponse:
    """Cancel a queued or running request: routers and workers answer it `cancelled` instead of running it,
    and a running one stops at its next token. Someone else's request is a 404."""
    if not storable(request_id):
        raise request_not_found(request_id)
    if not caller.allows("requests:all"):  # an admin may cancel any id, even one not published yet
        owner = chat.caller_of(request_id)
        if owner is None:
            stored = await fetch_request(engine, request_id)
            owner = stored.request["caller"] if stored is not None and stored.request is not None else None
        if not caller.can_see(owner):
            raise request_not_found(request_id)
    await chat.cancel(request_id, requested_by=caller.key_id)
    return CancellationResponse(id=request_id)


def request_not_found(request_id: str) -> ApiError:
    return ApiError(
        404, f"No request with id '{request_id}'", "invalid_request_error", "request_id", "request_not_found"
    )


@router.get("/requests/{request_id}", response_model=RequestStatus)
async def get_request(request_id: str, engine: EngineDep, caller: RequestsCaller) -> RequestStatus:
    """A request's status, routing, attempts, trace id and result, whoever published it (an admin's
    key sees every request; other keys only their own: someone else's is a 404)."""
    stored = await fetch_request(engine, request_id, owner=None if caller.allows("requests:all") else caller.key_id)
    if stored is None:
        raise request_not_found(request_id)
    return request_status(stored)


@router.post("/feedback", status_code=202, response_model=FeedbackReceipt)
async def create_feedback(body: FeedbackRequest, chat: ChatServiceDep, caller: FeedbackCaller) -> FeedbackReceipt:
    """Score a completion from -1 (thumbs down) to 1 (thumbs up), with an optional comment."""
    return await send_feedback(chat, body, caller.key_id)
