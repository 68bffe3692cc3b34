"""The labelling rule of `autoglm router export-feedback`, without a database."""

from __future__ import annotations

import io
import json
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from services.router.feedback_export import LabelRule, Rated, label_feedback, split_of, write_rows
from services.router.training import load_splits

LABELLED = Path(__file__).resolve().parents[2] / "data" / "router" / "labelled.jsonl"
RULE = LabelRule(light_pool="light")


def rated(prompt: str, feedback: float, pool: str | None = "light", status: str = "ok", **fields: Any) -> Rated:
    messages = fields.pop("messages", [{"role": "user", "content": prompt}])
    return Rated(
        request_id="chatcmpl-x",
        feedback=feedback,
        messages=messages,
        pool=pool,
        status=status,
        routing_score=fields.pop("routing_score", 0.2),
    )


def labels(export_rows: list[dict[str, Any]]) -> dict[str, int]:
    return {row["prompt"]: row["label"] for row in export_rows}


def test_a_poorly_rated_light_answer_is_hard_and_a_well_rated_one_easy() -> None:
    export = label_feedback([rated("prove it", -1), rated("say hi", 1)], RULE)
    assert labels(export.rows) == {"prove it": 1, "say hi": 0}
    assert export.rows[0] == {
        "prompt": "prove it",
        "label": 1,
        "source": "feedback-light",
        "split": split_of("prove it"),
    }
    assert export.misrouted == 1  # scored 0.2, below the threshold, yet the light answer failed


def test_heavy_answers_and_errors_say_nothing_about_the_light_model() -> None:
    export = label_feedback(
        [rated("a", 1, pool="heavy"), rated("b", -1, pool="heavy"), rated("c", -1, status="error")], RULE
    )
    assert export.rows == []
    assert export.skipped_feedback == {"on other pools' answers": 2, "on errors": 1}


def test_scores_of_one_prompt_are_averaged_and_a_lukewarm_mean_is_left_out() -> None:
    export = label_feedback([rated("mixed", 1), rated("mixed", -1), rated("bad", -1), rated("bad", 0)], RULE)
    assert labels(export.rows) == {"bad": 1}
    assert export.skipped_prompts == {"with a mean score in between": 1}


def test_a_prompt_needs_min_count_scores() -> None:
    rule = LabelRule(light_pool="light", min_count=2)
    export = label_feedback([rated("once", -1), rated("twice", 1), rated("twice", 1)], rule)
    assert labels(export.rows) == {"twice": 0}
    assert export.skipped_prompts == {"with fewer than 2 scores": 1}


def test_the_prompt_is_the_users_turns_as_the_scorer_reads_them() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    blank = [{"role": "system", "content": "x"}, {"role": "user", "content": " "}]
    export = label_feedback([rated("", -1, messages=messages), rated("", -1, messages=blank)], RULE)
    assert labels(export.rows) == {"first\nsecond": 1}
    assert export.skipped_feedback == {"with no user text": 1}


@pytest.mark.parametrize(("hard", "easy", "count"), [(0.5, 0.5, 1), (-2.0, 0.5, 1), (-0.5, 0.5, 0)])
def test_a_rule_that_contradicts_itself_is_refused(hard: float, easy: float, count: int) -> None:
    with pytest.raises(ValueError):
        LabelRule(light_pool="light", hard_at_most=hard, easy_at_least=easy, min_count=count)


def test_the_split_is_the_benchmark_files_so_a_prompt_keeps_it_in_either() -> None:
    with LABELLED.open(encoding="utf-8") as data:
        for line in islice(data, 500):
            row = json.loads(line)
            assert split_of(row["prompt"]) == row["split"]


def test_the_rows_are_read_by_the_training_loader(tmp_path: Path) -> None:
    export = label_feedback([rated(f"question {index}", (-1) ** index) for index in range(40)], RULE)
    out = io.StringIO()
    write_rows(export.rows, out)
    path = tmp_path / "feedback.jsonl"
    path.write_text(out.getvalue(), encoding="utf-8")
    splits = load_splits(path)
    assert sum(len(split.prompts) for split in splits.values()) == 40
    assert sorted(int(label) for split in splits.values() for label in split.labels) == [0] * 20 + [1] * 20
