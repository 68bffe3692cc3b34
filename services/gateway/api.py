"""HTTP routes: thin translations between OpenAI's API and the chat service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.gateway.errors import ApiError, error_from_result
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
from shared.registry import RegistryView


def get_chat_service(request: Request) -> ChatService:
    """The app's chat service (built in the lifespan)."""
    service: ChatService = request.app.state.chat
    return service


def get_registry(request: Request) -> RegistryView:
    """The app's view of the model registry (fed by the broker)."""
    registry: RegistryView = request.app.state.registry
    return registry


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
RegistryDep = Annotated[RegistryView, Depends(get_registry)]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 409, 500, 503, 504)}
CACHE_HEADER = "X-AutoGLM-Cache"
CacheControl = Annotated[
    str | None,
    Header(description="`no-cache` (or `no-store`) bypasses the response cache for this request."),
]


def event_stream_docs(chunk: type) -> dict[int | str, dict[str, object]]:
    """OpenAPI: a 200 is JSON, or with `stream: true` server-sent events of `chunk` objects."""
    schema = {"type": "string", "description": f"`data: <{chunk.__name__} JSON>` events, then `data: [DONE]`."}
    return {200: {"content": {"text/event-stream": {"schema": schema}}}}


router = APIRouter(prefix="/v1", responses=ERRORS)  # type: ignore[arg-type]


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=event_stream_docs(ChatCompletionChunk),  # type: ignore[arg-type]
)
async def create_chat_completion(
    body: ChatCompletionRequest, chat: ChatServiceDep, cache_control: CacheControl = None
) -> Response:
    """Create a chat completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    return await answer(body, chat, cache_control, ChatCompletionResponse, ChatChunks)


@router.post(
    "/completions",
    response_model=TextCompletionResponse,
    responses=event_stream_docs(TextCompletionChunk),  # type: ignore[arg-type]
)
async def create_completion(
    body: CompletionRequest, chat: ChatServiceDep, cache_control: CacheControl = None
) -> Response:
    """Continue a prompt (OpenAI's legacy completions): no chat template is applied."""
    return await answer(body, chat, cache_control, TextCompletionResponse, TextChunks)


async def answer(
    body: GenerationParams,
    chat: ChatService,
    cache_control: str | None,
    response_type: type[ChatCompletionResponse | TextCompletionResponse],
    chunk_format: type[ChatChunks | TextChunks],
) -> Response:
    """Run the request (or take it from the cache) and answer as JSON or as a stream."""
    request = chat.new_request(body)
    lookup = chat.look_up(request, bypass=any(word in (cache_control or "") for word in ("no-cache", "no-store")))
    headers = {CACHE_HEADER: lookup.status}
    if body.stream:
        stream = await chat.open_stream(request, lookup)
        chunks: ChunkFormat = chunk_format(stream.request_id, int(request.created_at.timestamp()), stream)
        return event_stream(stream, chunks, body.include_usage, headers)
    result = await chat.complete(request, lookup)
    if result.error is not None:
        raise error_from_result(result)
    return JSONResponse(response_type.from_result(result).model_dump(mode="json"), headers=headers)


def event_stream(stream: ReplyStream, chunks: ChunkFormat, include_usage: bool, headers: dict[str, str]) -> Response:
    return StreamingResponse(
        server_sent_events(stream, chunks, include_usage),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies must not buffer it
    )


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)
async def get_models(chat: ChatServiceDep, registry: RegistryDep) -> ModelList:
    """Models that can be requested: `auto`, each pool and each model that a live worker serves."""
    return ModelList(data=list_models(chat.settings, registry))


@router.get("/models/{model_id}", response_model=ModelCard, response_model_exclude_none=True)
async def get_model(model_id: str, chat: ChatServiceDep, registry: RegistryDep) -> ModelCard:
    """One entry of the list; an OpenAI 404 when it is not there."""
    model = find_model(chat.settings, registry, model_id)
    if model is None:
        raise ApiError(
            404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
        )
    return model


@router.post("/requests/{request_id}/cancel", status_code=202, response_model=CancellationResponse)
async def cancel_request(request_id: str, chat: ChatServiceDep) -> CancellationResponse:
    """Cancel a queued request: routers and workers answer it `cancelled` instead of running it."""
    await chat.cancel(request_id)
    return CancellationResponse(id=request_id)
