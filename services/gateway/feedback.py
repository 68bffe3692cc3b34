"""`POST /v1/feedback`: a client's score of a completion, published for the exporter to store."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.serving import ChatService
from shared import topics
from shared.messages import Feedback


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback` body. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)  # e.g. `stream: 0` is a 400, not False

    request_id: str = Field(min_length=1, max_length=128, description="The completion's `id`.")
    score: float = Field(ge=-1.0, le=1.0, description="-1 is thumbs down, 1 thumbs up; anything between.")
    comment: str | None = Field(default=None, max_length=2000)


class FeedbackReceipt(BaseModel):
    """The feedback is on its way to PostgreSQL (202)."""

    id: str
    object: Literal["feedback"] = "feedback"
    request_id: str


async def send_feedback(chat: ChatService, body: FeedbackRequest, caller: str | None) -> FeedbackReceipt:
    """Publish the feedback keyed by its request id (so one request's feedback stays in order)."""
    feedback = Feedback(request_id=body.request_id, score=body.score, comment=body.comment, caller=caller)
    await chat.publish_or_503(feedback, topics.FEEDBACK, body.request_id.encode())
    return FeedbackReceipt(id=feedback.feedback_id, request_id=feedback.request_id)
