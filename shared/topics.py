"""Kafka topic names. Partition counts come from `deploy/deployment.yaml` (`topics:`)."""

REQUESTS = "autoglm.requests"
"""ChatRequest: gateway or any producer -> router."""

RESULTS = "autoglm.results"
"""ChatResult for every request, keyed by request id: worker -> exporter and producers."""

REPLIES = "autoglm.replies"
"""ChatResult copies for waiting gateways; partition N belongs to gateway instance N."""

DEADLETTER = "autoglm.deadletter"
"""DeadLetter: messages that could not be processed, with the reason."""

JOBS_PREFIX = "autoglm.jobs."


def jobs_topic(pool: str) -> str:
    """Topic that feeds the workers of `pool` (RoutedJob)."""
    return f"{JOBS_PREFIX}{pool}"


PRIORITY_SUFFIX = ".priority"


def priority_topic(pool: str) -> str:
    """Topic of `pool`'s urgent jobs (RoutedJob): its workers run them before the normal ones."""
    return f"{JOBS_PREFIX}{pool}{PRIORITY_SUFFIX}"


RETRY_PREFIX = "autoglm.retry."

ATTEMPT_HEADER = "x-autoglm-attempt"
"""Header of a retry record: the attempt it will be (2 is the first retry)."""

NOT_BEFORE_HEADER = "x-autoglm-not-before-ms"
"""Header of a retry record: Unix milliseconds before which it must not run."""

RETRY_ERROR_HEADER = "x-autoglm-error"
"""Header of a retry record: why the previous attempt failed (`Type: message`, truncated)."""

REGISTRY = "autoglm.registry"
"""ModelCard heartbeats, keyed by worker instance and model; compacted (latest card per key)."""


def retry_topic(pool: str) -> str:
    """Topic of `pool`'s jobs waiting for another attempt (RoutedJob, attempt in headers)."""
    return f"{RETRY_PREFIX}{pool}"


def worker_group(pool: str) -> str:
    """Consumer group shared by every replica of a pool (its jobs and priority topics); autoscalers read its lag."""
    return f"autoglm-worker-{pool}"


def worker_retry_group(pool: str) -> str:
    """Consumer group of a pool's retry topic."""
    return f"{worker_group(pool)}-retry"


CONTROL = "autoglm.control"
"""CancelRequest: read by every router and worker instance (no consumer group)."""

FEEDBACK = "autoglm.feedback"
"""Feedback: clients' scores of completions, keyed by request id: gateway -> exporter."""

SPANS = "autoglm.spans"
"""OTLP ExportTraceServiceRequest bytes (opentelemetry-proto): every service's finished spans -> exporter."""
