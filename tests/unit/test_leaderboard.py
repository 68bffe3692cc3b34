"""The leaderboard's scoring: z-scores, weights, windows and model-card features (no database)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.leaderboard import (
    WEIGHTS,
    ModelStats,
    WindowError,
    card_features,
    parse_window,
    rank,
    zscores,
)
from shared.messages import ModelCard, TensorSpec, utcnow


def stats(model: str, *, requests: int = 100, errors: int = 0, timeouts: int = 0, p50: float | None = 100.0,
          p95: float | None = 200.0, tps: float | None = 50.0) -> ModelStats:  # fmt: skip
    return ModelStats(model, requests, errors, timeouts, p50, p95, tps)


def test_weights_are_the_seeds_and_add_up_to_one() -> None:
    assert WEIGHTS == {"performance": 0.4, "stability": 0.3, "activity": 0.2, "compatibility": 0.1}
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)


def test_zscores_centre_on_zero_and_identical_values_score_zero() -> None:
    assert zscores([1.0, 2.0, 3.0]) == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)
    assert zscores([5.0, 5.0]) == [0.0, 0.0]
    assert zscores([7.0]) == [0.0]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86_400), ("7d", 604_800)])
def test_a_window_is_a_count_and_a_unit(text: str, seconds: int) -> None:
    assert parse_window(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0h", "24", "1y", "-5m", "400d", "1.5h"])
def test_a_bad_window_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(WindowError, match="window"):
        parse_window(text)


def test_a_slow_model_ranks_below_a_fast_one_with_the_same_traffic() -> None:
    board = rank([stats("slow", p50=900.0, p95=2000.0, tps=5.0), stats("fast")], {})
    assert [row.model for row in board] == ["fast", "slow"]
    assert board[0].performance > 0 > board[1].performance and board[0].activity == board[1].activity == 0


def test_errors_and_timeouts_cost_stability() -> None:
    board = rank([stats("flaky", errors=20, timeouts=10), stats("steady")], {})
    assert [row.model for row in board] == ["steady", "flaky"]
    assert board[1].error_rate == 0.2 and board[1].timeout_rate == 0.1 and board[1].stability < 0


def test_a_model_with_no_success_is_placed_with_the_slowest() -> None:
    board = rank([stats("dead", errors=100, p50=None, p95=None, tps=None), stats("slow", p50=900.0), stats("ok")], {})
    assert board[-1].model == "dead" and board[-1].p50_ms is None


def test_traffic_and_card_features_break_a_tie_of_otherwise_equal_models() -> None:
    busy = rank([stats("busy", requests=300), stats("quiet", requests=100)], {})
    assert [row.model for row in busy] == ["busy", "quiet"] and busy[0].traffic_share == 0.75
    rich = rank([stats("plain"), stats("rich")], {"rich": {"batching", "long_context"}})
    assert [row.model for row in rich] == ["rich", "plain"] and rich[0].features == ["batching", "long_context"]


def test_the_board_holds_the_top_ten_ranked_from_one() -> None:
    board = rank([stats(f"m{i}", p50=100.0 + i) for i in range(14)], {})
    assert [row.rank for row in board] == list(range(1, 11))
    assert board[0].model == "m0" and rank([], {}) == []


def test_card_features_come_from_what_the_worker_declares() -> None:
    card = ModelCard(
        model_id="big", pool="heavy", backend="torch", framework="transformers", precision="float16",
        device="cuda:0", max_batch_size=32, max_context_tokens=32_768, instance_id="host-1", started_at=utcnow(),
        inputs=[TensorSpec(name="messages", dtype="chat_message", shape=[-1])],
        outputs=[TensorSpec(name="choices", dtype="chat_message", shape=[1])],
    )  # fmt: skip
    assert card_features(card) == {"input:messages", "output:choices", "batching", "long_context", "gpu"}
