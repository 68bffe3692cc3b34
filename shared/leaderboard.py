"""The model leaderboard (the seeds' composite score), computed from the stored results.

Per model over a time window: performance (40%: latency p50 and p95, generation throughput),
stability (30%: error and timeout rates), activity (20%: share of the traffic) and compatibility
(10%: features its model card declares). Each raw measure is z-score normalised across the models
on the board, so a score says how a model compares with the others, not how it does in absolute
terms; 0 is average. Caller errors (invalid requests) and cancellations say nothing about a model
and are left out. Used by the gateway's `GET /v1/leaderboard` and by `autoglm leaderboard`.
"""

from __future__ import annotations

import asyncio
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import topics
from shared.messages import ModelCard, utcnow
from shared.registry import RegistryView
from shared.settings import CommonSettings

WEIGHTS = {"performance": 0.4, "stability": 0.3, "activity": 0.2, "compatibility": 0.1}
"""The seeds' weights of the four components."""

TOP = 10
MAX_WINDOW = timedelta(days=366)
WINDOW_PATTERN = r"^[1-9][0-9]{0,5}[smhd]$"
"""A window as a count and a unit: `90s`, `15m`, `24h`, `7d`."""
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
LONG_CONTEXT_TOKENS = 8192
NOT_THE_MODELS_FAULT = ("invalid_request_error", "cancelled")


class WindowError(ValueError):
    """A window that is not `<count><s|m|h|d>` or is longer than a year."""


def parse_window(value: str) -> timedelta:
    """`24h` -> 24 hours; at most 366 days."""
    if not re.fullmatch(WINDOW_PATTERN, value):
        raise WindowError(f"window {value!r}: expected a count and a unit, e.g. 90s, 15m, 24h or 7d")
    window = timedelta(seconds=int(value[:-1]) * UNIT_SECONDS[value[-1]])
    if window > MAX_WINDOW:
        raise WindowError(f"window {value!r}: at most {MAX_WINDOW.days} days")
    return window


@dataclass(frozen=True)
class ModelStats:
    """What the stored results say about one model in the window."""

    model: str
    requests: int
    errors: int  # failures of the model or its worker (timeouts counted apart)
    timeouts: int
    p50_ms: float | None  # of successful requests; None when none succeeded
    p95_ms: float | None
    tokens_per_s: float | None  # completion tokens per second of inference


class Standing(BaseModel):
    """One model's place on the board, its components (z-scores) and the raw measures behind them."""

    rank: int = Field(ge=1)
    model: str
    score: float = Field(description="0.4 performance + 0.3 stability + 0.2 activity + 0.1 compatibility.")
    performance: float = Field(description="Mean z-score of -p50, -p95 and throughput.")
    stability: float = Field(description="Mean z-score of -error rate and -timeout rate.")
    activity: float = Field(description="z-score of the share of traffic.")
    compatibility: float = Field(description="z-score of the number of features the model card declares.")
    requests: int
    error_rate: float
    timeout_rate: float
    p50_ms: float | None
    p95_ms: float | None
    tokens_per_s: float | None
    traffic_share: float
    features: list[str] = Field(description="What the model card (or the deployment file) declares.")


class Leaderboard(BaseModel):
    """The top models over a window, best first."""

    object: str = "leaderboard"
    window: str = Field(examples=["24h"])
    since: datetime
    until: datetime
    weights: dict[str, float] = Field(default_factory=lambda: dict(WEIGHTS))
    data: list[Standing]


STATS_QUERY = text(
    """
    SELECT model,
           count(*) AS requests,
           count(*) FILTER (WHERE status = 'error' AND error_type IS DISTINCT FROM 'timeout') AS errors,
           count(*) FILTER (WHERE error_type = 'timeout') AS timeouts,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE status = 'ok') AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE status = 'ok') AS p95_ms,
           sum(completion_tokens) FILTER (WHERE status = 'ok') AS tokens,
           sum(inference_ms) FILTER (WHERE status = 'ok') AS inference_ms
      FROM results
     WHERE completed_at >= :since AND completed_at <= :until AND model IS NOT NULL
       AND NOT (coalesce(error_type, '') = ANY(:excluded))
     GROUP BY model
    """
)


async def model_stats(engine: AsyncEngine, since: datetime, until: datetime) -> list[ModelStats]:
    """Per-model measures of the results completed in [since, until]."""
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                STATS_QUERY, {"since": since, "until": until, "excluded": list(NOT_THE_MODELS_FAULT)}
            )
        ).all()
    return [
        ModelStats(
            model=row.model,
            requests=row.requests,
            errors=row.errors,
            timeouts=row.timeouts,
            p50_ms=row.p50_ms,
            p95_ms=row.p95_ms,
            tokens_per_s=row.tokens / (row.inference_ms / 1000) if row.tokens and row.inference_ms else None,
        )
        for row in rows
    ]


def zscores(values: Sequence[float]) -> list[float]:
    """(x - mean) / standard deviation; all 0 when the values do not differ."""
    if len(values) < 2:
        return [0.0] * len(values)
    mean, spread = statistics.fmean(values), statistics.pstdev(values)
    return [0.0 if spread == 0 else (value - mean) / spread for value in values]


def worst_if_missing(values: Sequence[float | None], worst: float) -> list[float]:
    """A model with no measure (nothing succeeded) is placed with the worst measured one."""
    return [worst if value is None else value for value in values]


def mean_of(*columns: list[float]) -> list[float]:
    return [statistics.fmean(parts) for parts in zip(*columns, strict=True)]


def rank(stats: Sequence[ModelStats], features: dict[str, set[str]], limit: int = TOP) -> list[Standing]:
    """The composite score of every model, best first, the top `limit` of them."""
    if not stats:
        return []
    total = sum(item.requests for item in stats)
    p50 = [item.p50_ms for item in stats]
    p95 = [item.p95_ms for item in stats]
    slowest50 = max((value for value in p50 if value is not None), default=0.0)
    slowest95 = max((value for value in p95 if value is not None), default=0.0)
    performance = mean_of(
        zscores([-value for value in worst_if_missing(p50, slowest50)]),
        zscores([-value for value in worst_if_missing(p95, slowest95)]),
        zscores([item.tokens_per_s or 0.0 for item in stats]),
    )
    stability = mean_of(
        zscores([-item.errors / item.requests for item in stats]),
        zscores([-item.timeouts / item.requests for item in stats]),
    )
    activity = zscores([item.requests / total for item in stats])
    compatibility = zscores([float(len(features.get(item.model, set()))) for item in stats])
    rows = []
    for index, item in enumerate(stats):
        parts = {
            "performance": performance[index],
            "stability": stability[index],
            "activity": activity[index],
            "compatibility": compatibility[index],
        }
        rows.append((sum(WEIGHTS[name] * value for name, value in parts.items()), item, parts))
    rows.sort(key=lambda row: (-row[0], row[1].model))
    return [
        Standing(
            rank=place,
            model=item.model,
            score=round(score, 4),
            **{k: round(v, 4) for k, v in parts.items()},
            requests=item.requests,
            error_rate=round(item.errors / item.requests, 4),
            timeout_rate=round(item.timeouts / item.requests, 4),
            p50_ms=rounded(item.p50_ms),
            p95_ms=rounded(item.p95_ms),
            tokens_per_s=rounded(item.tokens_per_s),
            traffic_share=round(item.requests / total, 4),
            features=sorted(features.get(item.model, set())),
        )
        for place, (score, item, parts) in enumerate(rows[:limit], start=1)
    ]


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def card_features(card: ModelCard) -> set[str]:
    """What a live worker's card declares: its named inputs and outputs, batching, long context, a GPU."""
    features = {f"input:{spec.name}" for spec in card.inputs} | {f"output:{spec.name}" for spec in card.outputs}
    if card.max_batch_size > 1:
        features.add("batching")
    if card.max_context_tokens >= LONG_CONTEXT_TOKENS:
        features.add("long_context")
    if card.device.startswith("cuda"):
        features.add("gpu")
    return features


def config_features(settings: CommonSettings) -> dict[str, set[str]]:
    """The same features as far as the deployment file tells them (a model no live worker describes)."""
    features: dict[str, set[str]] = {}
    for pool in settings.pools.values():
        for model in pool.models:
            found = set()
            if pool.batching.enabled and pool.batching.max_batch_size > 1:
                found.add("batching")
            if model.max_context_tokens >= LONG_CONTEXT_TOKENS:
                found.add("long_context")
            if pool.device == "cuda":
                found.add("gpu")
            features[model.id] = found
    return features


def model_features(settings: CommonSettings, cards: Iterable[ModelCard]) -> dict[str, set[str]]:
    """Features per model: from live cards where there are some, else from the deployment file."""
    features = config_features(settings)
    from_cards: dict[str, set[str]] = {}
    for card in cards:
        from_cards.setdefault(card.model_id, set()).update(card_features(card))
    return {**features, **from_cards}


async def build_leaderboard(
    engine: AsyncEngine, window: str, features: dict[str, set[str]], *, limit: int = TOP, now: datetime | None = None
) -> Leaderboard:
    """The board over the `window` (e.g. `24h`) ending now."""
    until = now or utcnow()
    since = until - parse_window(window)
    stats = await model_stats(engine, since, until)
    return Leaderboard(window=window, since=since, until=until, data=rank(stats, features, limit))


async def read_live_cards(bootstrap: str, timeout_s: float = 5.0) -> list[ModelCard]:
    """The registry's live cards, read once from its compacted topic (for a process that does not follow it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partition = TopicPartition(topics.REGISTRY, 0)
    view = RegistryView()
    try:
        await consumer.start()
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        async with asyncio.timeout(timeout_s):
            while await consumer.position(partition) < end:
                for records in (await consumer.getmany(partition, timeout_ms=500)).values():
                    for record in records:
                        view.apply_record(record)
    finally:
        await consumer.stop()
    return view.live_models()


def render(board: Leaderboard) -> str:
    """The board as a table for a terminal."""
    lines = [
        f"Leaderboard over {board.window} ({board.since:%Y-%m-%d %H:%M} to {board.until:%Y-%m-%d %H:%M} UTC)",
        f"{'#':>2} {'MODEL':<24} {'SCORE':>7} {'PERF':>6} {'STAB':>6} {'ACT':>6} {'COMP':>6} "
        f"{'REQS':>6} {'ERR%':>6} {'P50MS':>8} {'P95MS':>8}",
    ]
    for row in board.data:
        lines.append(
            f"{row.rank:>2} {row.model[:24]:<24} {row.score:>7.3f} {row.performance:>6.2f} {row.stability:>6.2f} "
            f"{row.activity:>6.2f} {row.compatibility:>6.2f} {row.requests:>6} "
            f"{100 * (row.error_rate + row.timeout_rate):>6.1f} {fmt_ms(row.p50_ms):>8} {fmt_ms(row.p95_ms):>8}"
        )
    if not board.data:
        lines.append("(no results in this window)")
    return "\n".join(lines)


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
