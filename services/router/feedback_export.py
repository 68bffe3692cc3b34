"""Clients' feedback as training data for the next scorer (`autoglm router export-feedback`).

Reads the `feedback` table joined with the request (its messages) and its result (the pool that
answered, the routing score) and writes rows in the format of data/router/labelled.jsonl. The rule,
argued in data/router/DATA.md: only answers of the light pool say something about whether the light
model was enough. A poorly rated light answer labels its prompt hard (1), a well rated one easy (0);
heavy answers, errors and lukewarm means are left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.router.learned import user_text
from shared.db.tables import FeedbackRow, RequestRow, ResultRow
from shared.messages import ChatMessage, ChatRequest

logger = logging.getLogger(__name__)

HARD, EASY = 1, 0


@dataclass(frozen=True)
class LabelRule:
    """When a prompt's feedback on light answers makes it a training row."""

    light_pool: str
    hard_at_most: float = -0.5  # mean score at or below: the light answer failed -> hard
    easy_at_least: float = 0.5  # mean score at or above: the light answer was good -> easy
    min_count: int = 1  # fewest feedback scores (over every light answer to the prompt)
    threshold: float = 0.5  # routing threshold, only to count the router's misses in the report

    def __post_init__(self) -> None:
        if not -1.0 <= self.hard_at_most < self.easy_at_least <= 1.0:
            raise ValueError("need -1 <= hard_at_most < easy_at_least <= 1")
        if self.min_count < 1:
            raise ValueError("min_count must be at least 1")


@dataclass(frozen=True)
class Rated:
    """One feedback score with what it was about: the request's prompt and the result's pool and score."""

    request_id: str
    feedback: float
    messages: list[dict[str, Any]]
    pool: str | None
    status: str
    routing_score: float | None


@dataclass
class Export:
    """The rows to write and what was left out, and why."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped_feedback: Counter[str] = field(default_factory=Counter)  # scores left out, by reason
    skipped_prompts: Counter[str] = field(default_factory=Counter)  # prompts left out, by reason
    misrouted: int = 0  # hard rows the router had scored below its threshold

    def summary(self) -> str:
        labels = Counter(row["label"] for row in self.rows)
        parts = [
            f"{len(self.rows)} rows ({labels[HARD]} hard, {labels[EASY]} easy; "
            f"{self.misrouted} hard prompts had been scored below the threshold)"
        ]
        if self.skipped_feedback:
            parts.append("feedback left out: " + describe(self.skipped_feedback))
        if self.skipped_prompts:
            parts.append("prompts left out: " + describe(self.skipped_prompts))
        return "; ".join(parts)


def describe(counts: Counter[str]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))


def split_of(prompt: str) -> str:
    """The split of data/router/build_dataset.py: a prompt lands in the same split in either file."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "validation" if bucket < 80 else "test"


def prompt_of(messages: list[dict[str, Any]]) -> str:
    """The user's turns, joined as the scorer reads them (and as the embedding cache keys them)."""
    request = ChatRequest(model="auto", messages=[ChatMessage.model_validate(m) for m in messages])
    return user_text(request)


def label_feedback(rated: Iterable[Rated], rule: LabelRule) -> Export:
    """Group light answers' feedback by prompt and label each prompt whose mean is clear enough."""
    export = Export()
    by_prompt: dict[str, list[Rated]] = {}
    for item in rated:
        reason = unusable(item, rule)
        if reason is not None:
            export.skipped_feedback[reason] += 1
            continue
        prompt = prompt_of(item.messages)
        if not prompt.strip():
            export.skipped_feedback["with no user text"] += 1
            continue
        by_prompt.setdefault(prompt, []).append(item)
    for prompt in sorted(by_prompt):  # sorted: the same table gives the same file
        label_prompt(export, prompt, by_prompt[prompt], rule)
    return export


def unusable(item: Rated, rule: LabelRule) -> str | None:
    """Why a score says nothing about whether the light model was enough (None: it does)."""
    if item.status != "ok":
        return "on errors"
    if item.pool != rule.light_pool:
        return "on other pools' answers"
    return None


def label_prompt(export: Export, prompt: str, items: list[Rated], rule: LabelRule) -> None:
    if len(items) < rule.min_count:
        export.skipped_prompts[f"with fewer than {rule.min_count} scores"] += 1
        return
    mean = sum(item.feedback for item in items) / len(items)
    if mean <= rule.hard_at_most:
        label = HARD
    elif mean >= rule.easy_at_least:
        label = EASY
    else:
        export.skipped_prompts["with a mean score in between"] += 1
        return
    routing_scores = [item.routing_score for item in items if item.routing_score is not None]
    if label == HARD and routing_scores and max(routing_scores) < rule.threshold:
        export.misrouted += 1
    export.rows.append(
        {"prompt": prompt, "label": label, "source": f"feedback-{rule.light_pool}", "split": split_of(prompt)}
    )


async def read_rated(engine: AsyncEngine, since: datetime | None) -> list[Rated]:
    """Every feedback score whose request and result are stored (feedback may arrive before them)."""
    query = (
        select(
            FeedbackRow.request_id,
            FeedbackRow.score,
            RequestRow.messages,
            ResultRow.pool,
            ResultRow.status,
            ResultRow.score.label("routing_score"),
        )
        .join(RequestRow, RequestRow.request_id == FeedbackRow.request_id)
        .join(ResultRow, ResultRow.request_id == FeedbackRow.request_id)
        .order_by(FeedbackRow.created_at, FeedbackRow.feedback_id)
    )
    if since is not None:
        query = query.where(FeedbackRow.created_at >= since)
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [
        Rated(
            request_id=row.request_id,
            feedback=row.score,
            messages=row.messages,
            pool=row.pool,
            status=row.status,
            routing_score=row.routing_score,
        )
        for row in rows
    ]


def write_rows(rows: list[dict[str, Any]], out: IO[str]) -> None:
    """One JSON object a line, as data/router/labelled.jsonl."""
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


async def export_feedback(engine: AsyncEngine, rule: LabelRule, since: datetime | None) -> Export:
    """Read the stored feedback and label it (the caller writes `rows`)."""
    rated = await read_rated(engine, since)
    export = label_feedback(rated, rule)
    logger.info("read %d feedback scores: %s", len(rated), export.summary())
    return export
