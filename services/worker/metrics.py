"""Prometheus metrics of a worker: batches, waiting, inference, tokens, outcomes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worker.execution import JobFailure, Outcome

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class WorkerMetrics:
    """The worker's instruments, registered on the service's registry."""

    batch_size: Histogram
    queue_wait: Histogram
    inference: Histogram
    generated_tokens: Counter
    outcomes: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, pool: str) -> WorkerMetrics:
        """Register the instruments, labelled with the pool."""
        labels = {"pool": pool}
        return cls(
            batch_size=Histogram(
                "autoglm_worker_batch_size", "Jobs per executed batch", ["pool"], buckets=BATCH_BUCKETS,
                registry=registry,
            ).labels(**labels),
            queue_wait=Histogram(
                "autoglm_worker_queue_wait_seconds", "From request creation until a worker took it", ["pool"],
                buckets=LATENCY_BUCKETS, registry=registry,
            ).labels(**labels),
            inference=Histogram(
                "autoglm_worker_inference_seconds", "Model time per batch", ["pool", "model"],
                buckets=LATENCY_BUCKETS, registry=registry,
            ),
            generated_tokens=Counter(
                "autoglm_worker_generated_tokens", "Completion tokens produced", ["pool", "model"], registry=registry
            ),
            outcomes=Counter(
                "autoglm_worker_outcomes", "Jobs by outcome (ok, error code, retry)", ["pool", "outcome"],
                registry=registry,
            ),
        )  # fmt: skip

    def observe(self, pool: str, outcomes: list[Outcome]) -> None:
        """Record one executed batch."""
        self.batch_size.observe(len(outcomes))
        model_runs: set[tuple[str, float]] = set()  # jobs of one model's sub-batch share its inference time
        for outcome in outcomes:
            if isinstance(outcome, JobFailure):
                self.outcomes.labels(pool, f"retry:{type(outcome.error).__name__}").inc()
                continue
            self.outcomes.labels(pool, "ok" if outcome.ok else f"error:{outcome.error.code}").inc()  # type: ignore[union-attr]
            self.queue_wait.observe(outcome.timings.queue_ms / 1000)
            model = outcome.model or "unknown"
            self.generated_tokens.labels(pool, model).inc(outcome.usage.completion_tokens)
            if outcome.timings.inference_ms:
                model_runs.add((model, outcome.timings.inference_ms))
        for model, inference_ms in model_runs:
            self.inference.labels(pool, model).observe(inference_ms / 1000)


def register_gpu_gauges(registry: CollectorRegistry) -> bool:
    """GPU memory (and utilisation, when NVML is there) of this process; False without a GPU."""
    torch = sys.modules.get("torch")  # only a worker whose backend imported torch can have one
    if torch is None or not torch.cuda.is_available():
        return False
    Gauge("autoglm_worker_gpu_memory_allocated_bytes", "CUDA memory held by tensors", registry=registry).set_function(
        torch.cuda.memory_allocated
    )
    Gauge(
        "autoglm_worker_gpu_memory_reserved_bytes", "CUDA memory reserved by the allocator", registry=registry
    ).set_function(torch.cuda.memory_reserved)
    try:
        torch.cuda.utilization()
    except Exception:
        return True  # utilisation needs NVML (pynvml); memory alone is still useful
    Gauge(
        "autoglm_worker_gpu_utilization_percent", "GPU busy time over the last sample", registry=registry
    ).set_function(torch.cuda.utilization)
    return True
