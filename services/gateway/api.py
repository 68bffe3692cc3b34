"""HTTP routes: thin translations between OpenAI's API and the chat service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.gateway.auth import ChatCaller, ModelsReader, RequestsCaller
from services.gateway.errors import ApiError, error_from_result
from services.gateway.limits import Admission
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
from shared.registry import RegistryView


def get_chat_service(request: Request) -> ChatService:
    """The app's chat service (built in the lifespan)."""
    service: ChatService = request.app.state.chat
    return service


def get_registry(request: Request) -> RegistryView:
    """The app's view of the model registry (fed by the broker)."""
    registry: RegistryView = request.app.state.registry
    return registry


def get_admission(request: Request) -> Admission:
    """The app's limits on requests, keys and in-flight work."""
    admission: Admission = request.app.state.admission
    return admission


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
RegistryDep = Annotated[RegistryView, Depends(get_registry)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 429, 500, 503, 504)}

router = APIRouter(prefix="/v1", responses=ERRORS)  # type: ignore[arg-type]


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, chat: ChatServiceDep, caller: ChatCaller, admission: AdmissionDep
) -> ChatCompletionResponse:
    """Create a chat completion (OpenAI-compatible, non-streaming)."""
    async with admission.admit(caller, body):
        result = await chat.complete(body, caller=caller.key_id)
    if result.error is not None:
        raise error_from_result(result)
    return ChatCompletionResponse.from_result(result)


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
async def cancel_request(request_id: str, chat: ChatServiceDep, caller: RequestsCaller) -> CancellationResponse:
    """Cancel a queued request: routers and workers answer it `cancelled` instead of running it."""
    await chat.cancel(request_id)
    return CancellationResponse(id=request_id)
