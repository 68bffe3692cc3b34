"""HTTP routes: thin translations between OpenAI's API and the chat service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.gateway.errors import error_from_result
from services.gateway.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelCard, ModelList
from services.gateway.serving import ChatService


def get_chat_service(request: Request) -> ChatService:
    """The app's chat service (built in the lifespan)."""
    service: ChatService = request.app.state.chat
    return service


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 500, 503, 504)}

router = APIRouter(prefix="/v1", responses=ERRORS)  # type: ignore[arg-type]


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, chat: ChatServiceDep) -> ChatCompletionResponse:
    """Create a chat completion (OpenAI-compatible, non-streaming)."""
    result = await chat.complete(body)
    if result.error is not None:
        raise error_from_result(result)
    return ChatCompletionResponse.from_result(result)


@router.get("/models", response_model=ModelList)
async def list_models(chat: ChatServiceDep) -> ModelList:
    """Models that can be requested: `auto`, each pool, and each served model."""
    pools = chat.settings.pools
    names = ["auto", *pools, *(model.id for pool in pools.values() for model in pool.models)]
    return ModelList(data=[ModelCard(id=name) for name in names])
