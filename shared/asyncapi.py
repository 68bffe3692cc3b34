"""The AsyncAPI document of the whole bus, for producers and consumers in any language."""

from __future__ import annotations

from typing import Any

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from prometheus_client import CollectorRegistry

from shared import topics
from shared.messages import (
    CancelRequest,
    ChatRequest,
    ChatResult,
    DeadLetter,
    Feedback,
    ModelCard,
    Reply,
    RoutedJob,
)


def build_asyncapi() -> dict[str, Any]:
    """Register every service's subscribers and every topic's message on one broker; describe it."""
    from services.exporter.config import ExporterSettings
    from services.exporter.handlers import register_handlers as exporter_handlers
    from services.exporter.metrics import ExporterMetrics
    from services.exporter.spans import register_span_handlers
    from services.gateway.config import GatewaySettings
    from services.gateway.handlers import register_handlers as gateway_handlers
    from services.gateway.replies import ReplyWaiters
    from services.router.config import RouterSettings
    from services.router.handlers import PoolState
    from services.router.handlers import register_handlers as router_handlers
    from services.router.load import PoolLoad
    from services.worker.config import WorkerSettings
    from services.worker.handlers import register_handlers as worker_handlers
    from services.worker.metrics import WorkerMetrics
    from shared.kafka import make_broker
    from shared.registry import RegistryView
    from shared.settings import load_settings

    settings = load_settings(RouterSettings)
    broker: KafkaBroker = make_broker(settings, service="bus", registry=CollectorRegistry())
    describe_topics(broker, settings.pools)
    router_handlers(broker, settings, PoolState(settings, RegistryView(), PoolLoad(settings)))
    for pool in settings.pools:
        worker_settings = load_settings(WorkerSettings, worker={"pool": pool})
        worker_handlers(broker, worker_settings, {}, WorkerMetrics.create(CollectorRegistry(), pool))
    exporter_settings = load_settings(ExporterSettings, telemetry={"forward_spans": False})
    exporter_metrics = ExporterMetrics.create(CollectorRegistry())
    exporter_handlers(broker, exporter_settings, engine=None, metrics=exporter_metrics)  # type: ignore[arg-type]
    register_span_handlers(broker, exporter_settings, engine=None, registry=CollectorRegistry())  # type: ignore[arg-type]
    gateway_handlers(broker, load_settings(GatewaySettings), ReplyWaiters())
    spec = AsyncAPI(broker, title="Open-AutoGLM message bus", version="1", schema_version="3.0.0")
    return spec.to_specification().to_jsonable()  # type: ignore[no-any-return]


def describe_topics(broker: KafkaBroker, pools: dict[str, Any]) -> None:
    """Publishers whose only job is to document which message each topic carries."""
    documented = {
        topics.REQUESTS: (ChatRequest, "Chat requests: publish here to ask for a completion."),
        topics.RESULTS: (ChatResult, "Every request's result, keyed by request id."),
        topics.REPLIES: (
            Reply,
            "For waiting gateways (partition = gateway instance): ChatChunks of streamed requests, then ChatResults.",
        ),
        topics.DEADLETTER: (DeadLetter, "Messages that could not be processed, with the reason."),
        topics.CONTROL: (CancelRequest, "Cancellations, read by every router and worker."),
        topics.FEEDBACK: (Feedback, "Clients' scores of completions, keyed by request id."),
        topics.REGISTRY: (ModelCard, "Live model cards (compacted; key instance_id/model_id; null = withdrawn)."),
        **{topics.jobs_topic(pool): (RoutedJob, f"Routed jobs for the {pool} pool.") for pool in pools},
        **{
            topics.priority_topic(pool): (RoutedJob, f"Urgent jobs of the {pool} pool, run before the normal ones.")
            for pool in pools
        },
        **{
            topics.retry_topic(pool): (RoutedJob, f"Jobs of the {pool} pool awaiting another attempt (headers).")
            for pool in pools
        },
    }
    for topic, (schema, description) in documented.items():
        broker.publisher(topic, schema=schema, description=description, title=f"{topic}:publish")
