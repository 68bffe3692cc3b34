"""HTTP routes: thin translations between OpenAI's API and the chat service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.errors import ApiError, error_from_result
from services.gateway.feedback import FeedbackReceipt, FeedbackRequest, send_feedback
from services.gateway.idempotency import REPLAYED_HEADER, IdempotentCompletions, Outcome
from services.gateway.models import find_model, list_models
from services.gateway.protocol import (
    CancellationResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from services.gateway.serving import ChatService
from services.gateway.tracking import RequestAccepted, RequestStatus, fetch_request, request_status, state_of
from shared.registry import RegistryView


def get_chat_service(request: Request) -> ChatService:
    """The app's chat service (built in the lifespan)."""
    service: ChatService = request.app.state.chat
    return service


def get_registry(request: Request) -> RegistryView:
    """The app's view of the model registry (fed by the broker)."""
    registry: RegistryView = request.app.state.registry
    return registry


def get_engine(request: Request) -> AsyncEngine:
    """The app's PostgreSQL engine (the exporter's tables, read only)."""
    engine: AsyncEngine = request.app.state.engine
    return engine


def get_idempotent(request: Request) -> IdempotentCompletions:
    """The app's runner of completions that carry an Idempotency-Key."""
    idempotent: IdempotentCompletions = request.app.state.idempotent
    return idempotent


def get_caller(request: Request) -> str | None:
    """Who is calling. None until API keys exist; then the caller's key id (requests are scoped to it)."""
    return None


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
RegistryDep = Annotated[RegistryView, Depends(get_registry)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
IdempotentDep = Annotated[IdempotentCompletions, Depends(get_idempotent)]
CallerDep = Annotated[str | None, Depends(get_caller)]
PreferHeader = Annotated[str | None, Header(description="`respond-async`: answer 202 at once, poll the request.")]
KeyHeader = Annotated[str | None, Header(description="A retried POST with the same key runs once.")]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 409, 422, 500, 503, 504)}

router = APIRouter(prefix="/v1", responses=ERRORS)  # type: ignore[arg-type]


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={202: {"model": RequestAccepted}})
async def create_chat_completion(
    *,
    body: ChatCompletionRequest,
    chat: ChatServiceDep,
    idempotent: IdempotentDep,
    caller: CallerDep,
    response: Response,
    prefer: PreferHeader = None,
    idempotency_key: KeyHeader = None,
) -> ChatCompletionResponse | JSONResponse:
    """Create a chat completion (OpenAI-compatible, non-streaming); `Prefer: respond-async` answers 202 at once."""
    wait = not prefers_async(prefer)
    if idempotency_key is not None:
        outcome = await idempotent.run(body, idempotency_key, caller, wait=wait)
    elif wait:
        result = await chat.complete(body)
        outcome = Outcome(result.request_id, result.created_at, result, replayed=False)
    else:
        request = chat.build_request(body, wait=False)
        await chat.submit(request)
        outcome = Outcome(request.request_id, request.created_at, None, replayed=False)
    if not wait:
        return accepted(outcome)
    assert outcome.result is not None  # waiting always ends in a result or an ApiError
    if outcome.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    if outcome.result.error is not None:
        raise error_from_result(outcome.result)
    return ChatCompletionResponse.from_result(outcome.result)


def prefers_async(prefer: str | None) -> bool:
    """True when the Prefer header (RFC 7240) asks for `respond-async`."""
    preferences = (prefer or "").split(",")
    return any(preference.split(";")[0].strip().lower() == "respond-async" for preference in preferences)


def accepted(outcome: Outcome) -> JSONResponse:
    """202: the request is queued (or was already there); poll its Location."""
    body = RequestAccepted(
        id=outcome.request_id, status=state_of(outcome.result), created=int(outcome.created_at.timestamp())
    )
    headers = {"Location": f"/v1/requests/{outcome.request_id}", "Preference-Applied": "respond-async"}
    if outcome.replayed:
        headers[REPLAYED_HEADER] = "true"
    return JSONResponse(body.model_dump(), status_code=202, headers=headers)


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


@router.get("/requests/{request_id}", response_model=RequestStatus)
async def get_request(request_id: str, engine: EngineDep, caller: CallerDep) -> RequestStatus:
    """A request's status, routing, attempts, trace id and result, whoever published it."""
    stored = await fetch_request(engine, request_id, owner=caller)
    if stored is None:
        raise ApiError(
            404, f"No request with id '{request_id}'", "invalid_request_error", "request_id", "request_not_found"
        )
    return request_status(stored)


@router.post("/feedback", status_code=202, response_model=FeedbackReceipt)
async def create_feedback(body: FeedbackRequest, chat: ChatServiceDep, caller: CallerDep) -> FeedbackReceipt:
    """Score a completion from -1 (thumbs down) to 1 (thumbs up), with an optional comment."""
    return await send_feedback(chat, body, caller)
