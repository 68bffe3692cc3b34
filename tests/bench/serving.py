"""`make bench`: serving throughput and latency through the real stack, batch=1 vs dynamic batching.

Starts the test stack (real Kafka, PostgreSQL, four services), then measures in one run:
  * the tiny light model called in-process (no bus), one request at a time;
  * the same request over HTTP (gateway -> router -> worker -> gateway) at 1, 8 and 32 concurrent
    clients, once with batching off (max_batch_size 1) and once with dynamic batching on,
    restarting the light worker between the two.
Prints a table and the ratios, and writes everything to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from services.worker.backends.base import GenerationInput
from services.worker.backends.torch_backend import TorchBackend
from services.worker.checkpoints import ensure_tiny_checkpoints
from shared.messages import ChatMessage, utcnow
from tests.e2e.harness import REPO, TEST_VAR_DIR, Stack, build_stack, start_infra, stop_infra

RESULTS_FILE = REPO / "bench" / "results" / "latest.json"
PROMPT = "Tell me a short story about a lighthouse."


@dataclass
class Measurement:
    """One scenario's figures."""

    scenario: str
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    requests_per_s: float
    tokens_per_s: float


def write_results(path: Path, document: dict[str, Any]) -> None:
    """Write a bench's figures as JSON under bench/results/ and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measurement(scenario: str, concurrency: int, latencies_ms: list[float], tokens: int, seconds: float) -> Measurement:
    """Summarise one scenario."""
    return Measurement(
        scenario, concurrency, len(latencies_ms), round(seconds, 3), round(statistics.median(latencies_ms), 1),
        round(percentile(latencies_ms, 99), 1), round(len(latencies_ms) / seconds, 1), round(tokens / seconds, 1),
    )  # fmt: skip


def bench_in_process(models_dir: Path, count: int, max_tokens: int) -> Measurement:
    """The model alone, one request at a time: the floor under every HTTP figure."""
    backend = TorchBackend.load("tiny-light", models_dir / "tiny-light", device="cpu", max_context_tokens=512)
    request = GenerationInput(
        "bench", [ChatMessage(role="user", content=PROMPT)], max_tokens=max_tokens, temperature=0.0
    )
    latencies, tokens = [], 0
    started = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        tokens += backend.generate([request])[0].completion_tokens
        latencies.append((time.perf_counter() - begin) * 1000)
    seconds = time.perf_counter() - started
    backend.close()
    return measurement("model in-process", 1, latencies, tokens, seconds)


async def bench_http(
    url: str,
    scenario: str,
    count: int,
    concurrency: int,
    max_tokens: int,
    *,
    headers: dict[str, str],
    cached: bool = False,
) -> Measurement:
    """`count` chat completions sent by `concurrency` clients (past the response cache unless `cached`)."""
    headers = headers if cached else {**headers, "Cache-Control": "no-cache"}
    body = {"model": "tiny-light", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    latencies: list[float] = []
    tokens = 0
    remaining = iter(range(count))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for _ in remaining:
            begin = time.perf_counter()
            response = await client.post(url, json=body)
            response.raise_for_status()
            latencies.append((time.perf_counter() - begin) * 1000)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
        (await client.post(url, json=body)).raise_for_status()  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return measurement(scenario, concurrency, latencies, tokens, time.perf_counter() - started)


async def bench_first_token(url: str, count: int, max_tokens: int, *, headers: dict[str, str]) -> Measurement:
    """`count` streamed completions, one at a time: the latency is until the first text arrives."""
    body = {"model": "tiny-light", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}  # fmt: skip
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=120, headers={**headers, "Cache-Control": "no-cache"}) as client:
        started = time.perf_counter()
        for _ in range(count):
            begin = time.perf_counter()
            async with client.stream("POST", url, json=body) as response:
                response.raise_for_status()
                first_text_ms = None
                async for line in response.aiter_lines():  # read to the end: the next request waits for it
                    if first_text_ms is None and '"content":"' in line and '"content":""' not in line:
                        first_text_ms = (time.perf_counter() - begin) * 1000  # the first text, not the role
                assert first_text_ms is not None, "the stream carried no text"
                latencies.append(first_text_ms)
    return measurement("first token", 1, latencies, 0, time.perf_counter() - started)


def restart_light_worker(stack: Stack, env: dict[str, str]) -> None:
    """Run the light pool's worker with other batching settings."""
    worker = next(service for service in stack.services if service.name == "worker-light")
    worker.stop()
    worker.env.update(env)
    worker.start(stack.env)
    stack.wait_ready()


MODES = {
    "batch=1": {"AUTOGLM_POOLS__LIGHT__BATCHING__ENABLED": "false"},
    "dynamic": {"AUTOGLM_POOLS__LIGHT__BATCHING__ENABLED": "true"},
}


def run_all(stack: Stack, args: argparse.Namespace, models_dir: Path) -> list[Measurement]:
    """Every scenario, in one run against one stack."""
    url = f"{stack.gateway_url}/v1/chat/completions"
    figures = [bench_in_process(models_dir, args.requests, args.max_tokens)]
    for mode, env in MODES.items():
        restart_light_worker(stack, env)
        for concurrency in args.concurrency:
            count = max(args.requests, concurrency * 4)
            figures.append(
                asyncio.run(bench_http(url, mode, count, concurrency, args.max_tokens, headers=stack.auth_headers))
            )
            print(f"  {mode:<8} c={concurrency:<3} done", flush=True)
    headers = stack.auth_headers
    figures.append(
        asyncio.run(bench_http(url, "cache hit", args.requests, 1, args.max_tokens, headers=headers, cached=True))
    )
    figures.append(asyncio.run(bench_first_token(url, args.requests, args.max_tokens, headers=headers)))
    print("  cache hits and first tokens done", flush=True)
    return figures


def ratios(figures: list[Measurement]) -> dict[str, float]:
    """Dynamic batching against batch=1 at each concurrency, and the bus against the model alone."""
    by_key = {(m.scenario, m.concurrency): m for m in figures}
    out = {}
    for (scenario, concurrency), dynamic in by_key.items():
        single = by_key.get(("batch=1", concurrency))
        if scenario == "dynamic" and single is not None:
            out[f"throughput dynamic/batch=1 at c={concurrency}"] = round(
                dynamic.requests_per_s / single.requests_per_s, 2
            )
            out[f"p50 dynamic/batch=1 at c={concurrency}"] = round(dynamic.p50_ms / single.p50_ms, 2)
    dynamic_alone = by_key[("dynamic", 1)]
    out["p50 cache hit / dynamic at c=1"] = round(by_key[("cache hit", 1)].p50_ms / dynamic_alone.p50_ms, 2)
    out["p50 first streamed token / whole answer at c=1"] = round(
        by_key[("first token", 1)].p50_ms / dynamic_alone.p50_ms, 2
    )
    model = by_key[("model in-process", 1)]
    out["p50 HTTP batch=1 c=1 / model in-process"] = round(by_key[("batch=1", 1)].p50_ms / model.p50_ms, 2)
    return out


def report(figures: list[Measurement], summary: dict[str, float], args: argparse.Namespace) -> None:
    """Print the table and write the JSON file."""
    print(f"\n{'scenario':<18}{'c':>4}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'tok/s':>9}")
    for m in figures:
        print(
            f"{m.scenario:<18}{m.concurrency:>4}{m.requests:>6}{m.p50_ms:>9}{m.p99_ms:>9}{m.requests_per_s:>8}{m.tokens_per_s:>9}"
        )
    print()
    for name, value in summary.items():
        print(f"{name:<48} {value}x")
    document = {
        "measured_at": utcnow().isoformat(), "machine": platform.platform(), "max_tokens": args.max_tokens,
        "scenarios": [asdict(m) for m in figures], "ratios": summary,
    }  # fmt: skip
    write_results(RESULTS_FILE, document)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--requests", type=int, default=64, help="requests per scenario (at least 4 per client)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    models_dir = TEST_VAR_DIR / "models"
    ensure_tiny_checkpoints(models_dir)
    print("starting Kafka, PostgreSQL and the four services ...", flush=True)
    infra = start_infra()
    stack = build_stack(infra, models_dir)
    stack.start()
    try:
        stack.wait_ready()
        figures = run_all(stack, args, models_dir)
    finally:
        stack.stop()
        stop_infra()
    report(figures, ratios(figures), args)


if __name__ == "__main__":
    main()
