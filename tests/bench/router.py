"""`make bench` (router part): learned-scorer decisions/s, and decision latency at a fixed arrival rate.

Prompts are the held-out split of data/router/labelled.jsonl, then the validation split: benchmark
questions, many longer than a chat turn. Three measurements, side by side in one run:

1. Throughput: the prompts scored in batches (as a router draining a batch of records would), with a
   cold embedding cache (every prompt new), then warm (the same prompts again).
2. The same cold pass with the previous embedding engine (torch fp32, 256 tokens): the cascade and
   its embedded share are the same, so the ratio is the engine's.
3. Fixed rate: requests arrive on a clock at `--rate` per second; the scorer takes whatever has
   arrived (up to `--batch-size`) as one batch, as the router's batched subscriber does, and decides
   its clear requests before embedding the others (services/router/handlers.route_batch). A
   decision's latency runs from its arrival to its score, queueing included.

Writes bench/results/router.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from services.router.config import DEFAULT_ARTEFACT, RouterSettings
from services.router.embedding import Embedder, EmbeddingSpec
from services.router.learned import Artefact, Scorer
from services.router.training import load_splits
from shared.messages import ChatRequest
from shared.service import tune_garbage_collector
from shared.settings import load_settings
from tests.bench.serving import percentile, write_results
from tests.e2e.harness import REPO

DATA = REPO / "data" / "router" / "labelled.jsonl"
RESULTS_FILE = REPO / "bench" / "results" / "router.json"
PREVIOUS_ENGINE = EmbeddingSpec(engine="torch", max_tokens=256)


def throughput(scorer: Scorer, requests: list[ChatRequest], batch_size: int) -> dict[str, float]:
    """Decisions/s, and p50/p99 of a batch's latency, scoring back to back."""
    batch_ms: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        t0 = time.perf_counter()
        scorer.score_batch(requests[start : start + batch_size])
        batch_ms.append((time.perf_counter() - t0) * 1000)
    seconds = time.perf_counter() - started
    return {
        "decisions": len(requests),
        "decisions_per_s": round(len(requests) / seconds, 1),
        "batch_p50_ms": round(percentile(batch_ms, 50), 2),
        "batch_p99_ms": round(percentile(batch_ms, 99), 2),
    }


def at_fixed_rate(scorer: Scorer, requests: list[ChatRequest], rate: float, batch_size: int) -> dict[str, float]:
    """Open loop: request i arrives at i / rate s and joins the first batch after it arrives. As in the router,
    a batch's clear requests are decided by the cheap stage at once, the others after their embedding."""
    latencies_ms: list[float] = []
    batches = 0
    started = time.perf_counter()
    arrivals = [started + i / rate for i in range(len(requests))]
    taken = 0
    while taken < len(requests):
        now = time.perf_counter()
        if arrivals[taken] > now:
            time.sleep(arrivals[taken] - now)
            continue
        arrived = taken
        while arrived < len(requests) and arrived - taken < batch_size and arrivals[arrived] <= now:
            arrived += 1
        first = scorer.score_clear(requests[taken:arrived])
        clear_done = time.perf_counter()
        undecided = [i for i, score in zip(range(taken, arrived), first, strict=True) if score is None]
        scorer.score_batch([requests[i] for i in undecided])
        embedded_done = time.perf_counter()
        latencies_ms += [
            ((clear_done if score is not None else embedded_done) - arrivals[i]) * 1000
            for i, score in zip(range(taken, arrived), first, strict=True)
        ]
        batches += 1
        taken = arrived
    return {
        "rate_per_s": rate,
        "decisions": len(requests),
        "achieved_per_s": round(len(requests) / (time.perf_counter() - started), 1),
        "mean_batch": round(len(requests) / batches, 2),
        "p50_ms": round(percentile(latencies_ms, 50), 2),
        "p99_ms": round(percentile(latencies_ms, 99), 2),
        "max_ms": round(max(latencies_ms), 2),
    }


def cold_pass(scorer: Scorer, requests: list[ChatRequest], batch_size: int) -> dict[str, float]:
    embedder = scorer.embedder
    assert isinstance(embedder, Embedder)
    computed = embedder.computed
    figures = throughput(scorer, requests, batch_size)
    figures["embedded_share"] = round((embedder.computed - computed) / len(requests), 3)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--prompts", type=int, default=600, help="prompts per throughput pass (default 600)")
    parser.add_argument("--batch-size", type=int, default=32, help="largest batch (default 32)")
    parser.add_argument("--rate", type=float, default=200.0, help="arrivals per second (default 200)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the fixed-rate run (default 8)")
    args = parser.parse_args(argv)
    settings = load_settings(RouterSettings)
    artefact = Artefact.load(settings.router.scorer.artefact or DEFAULT_ARTEFACT)
    threshold, band = settings.routing.threshold, settings.router.scorer.band
    splits = load_splits(DATA)
    prompts = splits["test"].requests + splits["validation"].requests
    fixed_rate_count = int(args.rate * args.seconds)
    if args.prompts + fixed_rate_count > len(prompts):
        parser.error(f"--prompts plus rate x seconds must stay within the {len(prompts)} held-out prompts")
    # every prompt is scored once per scorer, so each pass starts with a cold cache for its own prompts
    throughput_prompts, rate_prompts = prompts[: args.prompts], prompts[args.prompts :][:fixed_rate_count]

    def scorer_with(spec: EmbeddingSpec) -> Scorer:
        embedder = Embedder(spec, 20_000, args.batch_size, threads=settings.router.scorer.embedding_threads)
        return Scorer(artefact, embedder, threshold, band)

    current = scorer_with(artefact.embedding)
    current.score_batch(prompts[-4:])  # load and warm the engine outside the timings
    tune_garbage_collector()  # as the router does once it is built
    cold = cold_pass(current, throughput_prompts, args.batch_size)
    warm = throughput(current, throughput_prompts, args.batch_size)
    fixed = at_fixed_rate(current, rate_prompts, args.rate, args.batch_size)
    # last: torch's idle OpenMP threads would otherwise share the cores with the runs above
    previous = scorer_with(PREVIOUS_ENGINE)
    previous.score_batch(prompts[-4:])
    cold_previous = cold_pass(previous, throughput_prompts, args.batch_size)
    document = {
        "machine": platform.machine(), "cpus": os.cpu_count(), "batch_size": args.batch_size,
        "threshold": threshold, "band": band, "embedding": artefact.embedding.to_json(),
        "cold_cache": cold, "warm_cache": warm,
        "cold_cache_previous_engine": {"embedding": PREVIOUS_ENGINE.to_json(), **cold_previous},
        "cold_speedup_over_previous_engine": round(cold["decisions_per_s"] / cold_previous["decisions_per_s"], 2),
        "fixed_rate_cold": fixed,
    }  # fmt: skip
    print(json.dumps(document, indent=2))
    write_results(RESULTS_FILE, document)


if __name__ == "__main__":
    main()
