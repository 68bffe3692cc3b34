"""`make bench`: the HTTP round trip through Kafka, side by side with the model alone, in one run.

Starts the test stack (real Kafka, PostgreSQL, four services), then measures:
  * in-process: the tiny light model generating one token, called directly (no bus);
  * sequential: one client, requests one after another through gateway -> router -> worker;
  * concurrent: several clients at once (dynamic batching at work);
each HTTP scenario once per batching window (`--max-wait-ms`), restarting the light worker.
The figures that matter are the ratios: what the bus adds on top of the model.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from services.worker.backends.base import GenerationInput
from services.worker.backends.torch_backend import TorchBackend
from services.worker.checkpoints import ensure_tiny_checkpoints
from shared.messages import ChatMessage
from tests.e2e.harness import TEST_VAR_DIR, Stack, build_stack, start_infra, stop_infra

BODY = {"model": "tiny-light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def describe(name: str, samples_ms: list[float], seconds: float) -> str:
    """One report line."""
    return (
        f"{name:<22} n={len(samples_ms):<5} p50={statistics.median(samples_ms):7.1f} ms  "
        f"p99={percentile(samples_ms, 99):7.1f} ms  {len(samples_ms) / seconds:7.1f} req/s"
    )


def bench_in_process(models_dir_path: str, count: int) -> list[float]:
    """Latency of the model alone for the same request."""
    from pathlib import Path

    backend = TorchBackend.load(
        "tiny-light", Path(models_dir_path) / "tiny-light", device="cpu", max_context_tokens=512
    )
    request = GenerationInput("bench", [ChatMessage(role="user", content="hi")], max_tokens=1, temperature=0.0)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        backend.generate([request])
        samples.append((time.perf_counter() - started) * 1000)
    backend.close()
    return samples


async def one_request(client: httpx.AsyncClient, url: str) -> float:
    """Milliseconds for one chat completion over HTTP."""
    started = time.perf_counter()
    response = await client.post(url, json=BODY)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def bench_http(url: str, count: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies of `count` requests sent by `concurrency` clients, and the wall time."""
    samples: list[float] = []
    queue = iter(range(count))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in queue:
            samples.append(await one_request(client, url))

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await one_request(client, url)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def restart_light_worker(stack: Stack, max_wait_ms: int) -> None:
    """Run the light pool's worker with another batching window."""
    worker = next(service for service in stack.services if service.name == "worker-light")
    worker.stop()
    worker.env["AUTOGLM_POOLS__LIGHT__BATCHING__MAX_WAIT_MS"] = str(max_wait_ms)
    worker.start(stack.env)
    stack.wait_ready()


def run_scenarios(stack: Stack, args: argparse.Namespace, models_dir: str) -> list[str]:
    """Every measurement, in one run against one stack."""
    url = f"{stack.gateway_url}/v1/chat/completions"
    local = bench_in_process(models_dir, args.requests)
    lines = [describe("model in-process", local, sum(local) / 1000)]
    medians, throughputs = {}, {}
    for max_wait_ms in args.max_wait_ms:
        restart_light_worker(stack, max_wait_ms)
        sequential, seq_s = asyncio.run(bench_http(url, args.requests, 1))
        concurrent, conc_s = asyncio.run(bench_http(url, args.requests, args.concurrency))
        lines.append(describe(f"HTTP seq, wait={max_wait_ms}ms", sequential, seq_s))
        lines.append(describe(f"HTTP c={args.concurrency}, wait={max_wait_ms}ms", concurrent, conc_s))
        medians[max_wait_ms] = statistics.median(sequential)
        throughputs[max_wait_ms] = len(concurrent) / conc_s
    first = args.max_wait_ms[0]
    lines.append("")
    lines.append(
        f"bus round trip adds {medians[first] - statistics.median(local):.1f} ms at p50 over the model alone "
        f"(wait={first}ms: {medians[first] / statistics.median(local):.1f}x the in-process p50)"
    )
    for max_wait_ms in args.max_wait_ms[1:]:
        lines.append(
            f"wait={max_wait_ms}ms vs wait={first}ms: sequential p50 {medians[max_wait_ms] / medians[first]:.2f}x, "
            f"throughput at c={args.concurrency} {throughputs[max_wait_ms] / throughputs[first]:.2f}x"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table and the ratios."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.round_trip", description=__doc__)
    parser.add_argument("--requests", type=int, default=200, help="requests per HTTP scenario")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=int, nargs="+", default=[0, 50], help="batching windows to compare")
    args = parser.parse_args(argv)

    models_dir = TEST_VAR_DIR / "models"
    ensure_tiny_checkpoints(models_dir)
    print("starting Kafka, PostgreSQL and the four services ...", flush=True)
    infra = start_infra()
    stack = build_stack(infra, models_dir)
    stack.start()
    try:
        stack.wait_ready()
        lines = run_scenarios(stack, args, str(models_dir))
    finally:
        stack.stop()
        stop_infra()
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
