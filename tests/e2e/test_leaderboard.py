"""The leaderboard over stored results: a slow, failing model ranks below a fast, healthy one, over HTTP
(GET /v1/leaderboard) and on the command line (autoglm leaderboard)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx

from shared.messages import utcnow
from tests.e2e.harness import REPO, Stack
from tests.e2e.test_pipeline import plain_dsn


async def seed_results(database_url: str, model: str, latencies_ms: list[float], errors: list[str]) -> None:
    """Results as the exporter stores them: one ok row per latency, one error row per error type."""
    now = utcnow()
    rows = [
        (f"chatcmpl-lb-{uuid.uuid4().hex}", "ok", model, None, 8, latency, latency / 2, now, now)
        for latency in latencies_ms
    ] + [(f"chatcmpl-lb-{uuid.uuid4().hex}", "error", model, error, 0, 30_000.0, 0.0, now, now) for error in errors]
    connection = await asyncpg.connect(plain_dsn(database_url))
    try:
        await connection.executemany(
            "INSERT INTO results (request_id, status, model, error_type, completion_tokens, total_ms, inference_ms,"
            " created_at, completed_at, prompt_tokens, queue_ms, batch_size)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 4, 1.0, 1)",
            rows,
        )
    finally:
        await connection.close()


async def seed_fast_and_slow(stack: Stack) -> tuple[str, str]:
    """Two models with the same traffic: one fast and healthy, one slow that fails and times out."""
    tag = uuid.uuid4().hex[:6]
    fast, slow = f"lb-fast-{tag}", f"lb-slow-{tag}"
    await seed_results(stack.infra.database_url, fast, [80.0 + i for i in range(40)], [])
    await seed_results(
        stack.infra.database_url, slow, [2500.0 + 40 * i for i in range(25)], ["server_error"] * 10 + ["timeout"] * 5
    )
    return fast, slow


async def test_a_slow_failing_model_ranks_below_a_fast_healthy_one(stack: Stack) -> None:
    fast, slow = await seed_fast_and_slow(stack)
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=stack.auth_headers, timeout=30) as client:
        response = await client.get("/v1/leaderboard", params={"window": "5m"})
    assert response.status_code == 200, response.text
    board = response.json()
    assert board["object"] == "leaderboard" and board["window"] == "5m" and len(board["data"]) <= 10
    assert board["weights"] == {"performance": 0.4, "stability": 0.3, "activity": 0.2, "compatibility": 0.1}
    ranks = {row["model"]: row for row in board["data"]}
    assert fast in ranks, board
    assert slow not in ranks or ranks[slow]["rank"] > ranks[fast]["rank"]
    if slow in ranks:
        assert ranks[fast]["performance"] > ranks[slow]["performance"]
        assert ranks[fast]["stability"] > ranks[slow]["stability"]
        assert ranks[slow]["error_rate"] == 0.25 and ranks[slow]["timeout_rate"] == 0.125
    assert [row["rank"] for row in board["data"]] == list(range(1, len(board["data"]) + 1))
    assert [row["score"] for row in board["data"]] == sorted((row["score"] for row in board["data"]), reverse=True)


async def test_the_leaderboard_refuses_a_bad_window_and_an_unknown_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        too_long = await client.get("/v1/leaderboard", params={"window": "400d"}, headers=stack.auth_headers)
        malformed = await client.get("/v1/leaderboard", params={"window": "yesterday"}, headers=stack.auth_headers)
        anonymous = await client.get("/v1/leaderboard")
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "window"
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    assert anonymous.status_code == 401 and "error" in anonymous.json()


async def test_the_cli_prints_the_same_ranking(stack: Stack) -> None:
    fast, slow = await seed_fast_and_slow(stack)
    env = {**os.environ, "AUTOGLM_DATABASE_URL": stack.infra.database_url,
           "AUTOGLM_KAFKA_BOOTSTRAP": stack.infra.kafka_bootstrap}  # fmt: skip

    def autoglm(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "autoglm"), "leaderboard", *args]
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)

    as_json = await asyncio.to_thread(autoglm, "--window", "5m", "--json")
    assert as_json.returncode == 0, as_json.stderr
    ranks = {row["model"]: row["rank"] for row in json.loads(as_json.stdout)["data"]}
    assert fast in ranks and (slow not in ranks or ranks[slow] > ranks[fast])
    table = await asyncio.to_thread(autoglm, "--window", "5m")
    assert table.returncode == 0 and "Leaderboard over 5m" in table.stdout and fast in table.stdout
    bad = await asyncio.to_thread(autoglm, "--window", "1y")
    assert bad.returncode == 2 and "window" in bad.stderr
