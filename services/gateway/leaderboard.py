"""`GET /v1/leaderboard`: the top models by the seeds' composite score (see shared/leaderboard.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.auth import ModelsReader
from services.gateway.dependencies import from_state
from services.gateway.errors import ApiError
from services.gateway.protocol import ErrorResponse
from services.gateway.serving import ChatService
from shared.leaderboard import TOP, WINDOW_PATTERN, Leaderboard, WindowError, build_leaderboard, model_features
from shared.registry import RegistryView

router = APIRouter(prefix="/v1", responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 500)})  # type: ignore[arg-type]

Window = Annotated[
    str, Query(pattern=WINDOW_PATTERN, description="How far back: a count and a unit (s, m, h, d), at most 366d.")
]
Limit = Annotated[int, Query(ge=1, le=TOP, description="How many models (at most 10).")]


@router.get("/leaderboard", response_model=Leaderboard)
async def get_leaderboard(
    *,
    chat: Annotated[ChatService, Depends(from_state("chat", ChatService))],
    registry: Annotated[RegistryView, Depends(from_state("registry", RegistryView))],
    engine: Annotated[AsyncEngine, Depends(from_state("engine", AsyncEngine))],
    caller: ModelsReader,
    window: Window = "24h",
    limit: Limit = TOP,
) -> Leaderboard:
    """The top models over the window by the composite score: performance 40% (latency p50/p95, throughput),
    stability 30% (error and timeout rates), activity 20% (traffic share), compatibility 10% (model card
    features), each z-score normalised across the models; from the stored results."""
    features = model_features(chat.settings, registry.cards())
    try:
        return await build_leaderboard(engine, window, features, limit=limit)
    except WindowError as error:
        raise ApiError(400, str(error), "invalid_request_error", "window", "invalid_window") from error
