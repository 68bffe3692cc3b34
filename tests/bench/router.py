"""`make bench` (router part): learned-scorer decisions/s and decision latency on the held-out prompts.

Scores the held-out split of data/router/labelled.jsonl in batches (as a router draining a batch of
requests would), with the cascade at the configured threshold and band, a cold embedding cache first
and then a warm one (the same prompts again). Per-decision latency is a batch's time over its size;
p99 is over batches. Writes bench/results/router.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from services.router.config import DEFAULT_ARTEFACT, RouterSettings
from services.router.embedding import Embedder
from services.router.learned import Artefact, Scorer
from services.router.training import load_splits
from shared.messages import ChatRequest
from shared.settings import load_settings
from tests.bench.serving import percentile
from tests.e2e.harness import REPO

DATA = REPO / "data" / "router" / "labelled.jsonl"
RESULTS_FILE = REPO / "bench" / "results" / "router.json"


def run_pass(scorer: Scorer, requests: list[ChatRequest], batch_size: int) -> dict[str, float]:
    """Decisions/s, p50/p99 of a batch's latency, and of the per-decision latency."""
    batch_ms: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        t0 = time.perf_counter()
        scorer.score_batch(batch)
        batch_ms.append((time.perf_counter() - t0) * 1000)
    seconds = time.perf_counter() - started
    return {
        "decisions": len(requests),
        "decisions_per_s": round(len(requests) / seconds, 1),
        "batch_p50_ms": round(percentile(batch_ms, 50), 2),
        "batch_p99_ms": round(percentile(batch_ms, 99), 2),
        "decision_p99_ms": round(percentile(batch_ms, 99) / batch_size, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--prompts", type=int, default=300, help="held-out prompts to score (default 300)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    settings = load_settings(RouterSettings)
    artefact = Artefact.load(settings.router.scorer.artefact or DEFAULT_ARTEFACT)
    embedder = Embedder(cache_size=10_000)
    scorer = Scorer(artefact, embedder, settings.routing.threshold, settings.router.scorer.band)
    rows = load_splits(DATA)["test"].requests
    requests = rows[:: max(len(rows) // args.prompts, 1)][: args.prompts]  # every source, in file order
    cold = run_pass(scorer, requests, args.batch_size)
    cold["embedded_share"] = round(embedder.computed / len(requests), 3)
    warm = run_pass(scorer, requests, args.batch_size)
    document = {"machine": platform.machine(), "cpus": os.cpu_count(), "batch_size": args.batch_size,
                "band": scorer.band, "threshold": scorer.threshold, "cold_cache": cold, "warm_cache": warm}  # fmt: skip
    print(json.dumps(document, indent=2))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {RESULTS_FILE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
