"""`autoglm router export-feedback` on the real stack: chats, feedback over HTTP, the exporter's rows, the JSONL.

The exported file is then mixed with a slice of the benchmark data and trained on with `autoglm router train`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from services.router.feedback_export import split_of
from tests.e2e.harness import REPO, Stack
from tests.e2e.test_pipeline import plain_dsn
from tests.e2e.test_routing_policies import HARD, chat, routing_of

BENCHMARK = REPO / "data" / "router" / "labelled.jsonl"


async def send_feedback(stack: Stack, request_id: str, score: float) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=30) as http:
        response = await http.post("/v1/feedback", json={"request_id": request_id, "score": score})
    assert response.status_code == 202, response.text


async def wait_for_feedback(stack: Stack, expected: dict[str, int], limit_s: float = 30.0) -> None:
    """Until the exporter has stored `expected[request_id]` feedback rows for every request."""
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        async with asyncio.timeout(limit_s):
            while True:
                rows = await connection.fetch(
                    "SELECT request_id, count(*) AS n FROM feedback WHERE request_id = ANY($1) GROUP BY request_id",
                    list(expected),
                )
                if {row["request_id"]: row["n"] for row in rows} == expected:
                    return
                await asyncio.sleep(0.2)
    finally:
        await connection.close()


def autoglm(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `autoglm` CLI with the stack's settings (its database among them)."""
    completed = subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        check=False, cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return completed


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def benchmark_slice(per_split_and_label: int) -> list[str]:
    """The first rows of each (split, label) of the benchmark file: a small but complete training set."""
    taken: dict[tuple[str, int], int] = {}
    lines = []
    for line in BENCHMARK.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        key = (row["split"], row["label"])
        if taken.get(key, 0) < per_split_and_label:
            taken[key] = taken.get(key, 0) + 1
            lines.append(line)
    return lines


async def test_feedback_on_light_answers_is_exported_as_training_rows_the_trainer_reads(
    stack: Stack, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    failed, fine, heavy = await asyncio.gather(
        chat(stack, f"What is the capital of Peru? ({tag})"),
        chat(stack, f"Say hello to Ana ({tag})"),
        chat(stack, f"{HARD} ({tag})"),
    )
    routings = await asyncio.gather(*(routing_of(stack, c["id"]) for c in (failed, fine, heavy)))
    assert [routing["pool"] for routing in routings] == ["light", "light", "heavy"]
    since = datetime.now(UTC)  # only this test's feedback is exported
    await send_feedback(stack, failed["id"], -1)
    await send_feedback(stack, failed["id"], -0.5)
    await send_feedback(stack, fine["id"], 1)
    await send_feedback(stack, heavy["id"], 1)
    await wait_for_feedback(stack, {failed["id"]: 2, fine["id"]: 1, heavy["id"]: 1})

    exported = tmp_path / "feedback.jsonl"
    run = await asyncio.to_thread(
        autoglm, stack, "router", "export-feedback", "--since", since.isoformat(), "--output", str(exported)
    )
    failed_prompt, fine_prompt = f"What is the capital of Peru? ({tag})", f"Say hello to Ana ({tag})"
    # The heavy answer's thumbs up says nothing about the light model: no row.
    assert read_jsonl(exported) == sorted(
        [
            {"prompt": failed_prompt, "label": 1, "source": "feedback-light", "split": split_of(failed_prompt)},
            {"prompt": fine_prompt, "label": 0, "source": "feedback-light", "split": split_of(fine_prompt)},
        ],
        key=lambda row: row["prompt"],
    )
    assert "2 rows (1 hard, 1 easy; 1 hard prompts had been scored below the threshold)" in run.stderr
    assert "1 on other pools' answers" in run.stderr

    stricter = await asyncio.to_thread(
        autoglm, stack, "router", "export-feedback", "--since", since.isoformat(), "--min-count", "2"
    )
    assert [json.loads(line)["prompt"] for line in stricter.stdout.splitlines()] == [failed_prompt]

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(benchmark_slice(25)) + "\n" + exported.read_text(encoding="utf-8"), encoding="utf-8")
    artefact = tmp_path / "scorer.json"
    trained = await asyncio.to_thread(
        autoglm, stack, "router", "train", "--data", str(mixed), "--output", str(artefact)
    )
    assert artefact.exists() and "held-out figures" in trained.stdout
    metrics = json.loads(artefact.read_text())["metrics"]
    assert metrics["rows"] == 50 + sum(split_of(p) == "test" for p in (failed_prompt, fine_prompt))
