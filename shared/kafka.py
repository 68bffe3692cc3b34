"""Kafka helpers: the broker factory with our producer defaults, topic creation, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream import ExceptionMiddleware
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaBroker as KafkaBrokerDep
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from shared import topics
from shared.messages import ChatResult, DeadLetter, ReplyRoute
from shared.settings import CommonSettings

logger = logging.getLogger(__name__)

# Producer defaults: nothing acknowledged before every in-sync replica has it (acks=all), no
# duplicates on producer retries (idempotence), and a small explicit linger so concurrent
# publishes share a request without adding noticeable latency.
PRODUCER_DEFAULTS: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 2}

# Consumer side of the latency budget: the broker answers a fetch as soon as one byte is there,
# and holds an empty fetch at most this long, so an idle consumer reacts within a few ms.
FETCH_MAX_WAIT_MS = 100


def dead_letter_middleware(service: str) -> ExceptionMiddleware:
    """Turn a message that does not match its schema into a dead letter instead of a crash loop."""
    middleware = ExceptionMiddleware()

    @middleware.add_handler(ValidationError)
    async def dead_letter_invalid(error: ValidationError, message: KafkaMessage, broker: KafkaBrokerDep) -> None:
        record = message.raw_message
        topic = record[0].topic if isinstance(record, tuple) else record.topic
        await publish_dead_letter(broker, service=service, source_topic=topic, body=message.body, error=error)

    return middleware


def make_broker(
    settings: CommonSettings, *, service: str, registry: CollectorRegistry, trace_messages: bool = True
) -> KafkaBroker:
    """A KafkaBroker with our producer defaults, Prometheus metrics and (with `trace_messages`) a span per
    message handled or published, in the trace its headers carry."""
    telemetry = [KafkaTelemetryMiddleware()] if trace_messages else []
    return KafkaBroker(
        settings.kafka_bootstrap,
        client_id=f"autoglm-{service}",
        allow_auto_create_topics=False,
        middlewares=[
            dead_letter_middleware(service),
            KafkaPrometheusMiddleware(registry=registry, app_name=service, metrics_prefix="autoglm"),
            *telemetry,
        ],
        logger=logging.getLogger(f"autoglm.bus.{service}"),
        log_level=logging.DEBUG,  # one line per message is too much at INFO
        graceful_timeout=30.0,
        description="Open-AutoGLM message bus",
        **PRODUCER_DEFAULTS,
    )


def topic_partitions(settings: CommonSettings) -> dict[str, int]:
    """Every topic the platform uses, with its partition count from the deployment file."""
    spec = settings.topics
    wanted = {
        topics.REQUESTS: spec.requests.partitions,
        topics.RESULTS: spec.results.partitions,
        topics.REPLIES: spec.replies.partitions,
        topics.DEADLETTER: spec.deadletter.partitions,
        topics.FEEDBACK: spec.feedback.partitions,
        topics.SPANS: spec.spans.partitions,
    }
    for name, pool in settings.pools.items():
        wanted[topics.jobs_topic(name)] = pool.partitions
        wanted[topics.priority_topic(name)] = pool.partitions
        wanted[topics.retry_topic(name)] = pool.partitions
    wanted[topics.REGISTRY] = 1
    wanted[topics.CONTROL] = 1
    return wanted


COMPACTED_TOPICS = {topics.REGISTRY}
"""Topics that keep only the latest message per key."""


async def ensure_topics(settings: CommonSettings) -> list[str]:
    """Create missing topics with the configured partition counts; returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name,
                num_partitions=count,
                replication_factor=settings.topics.replication_factor,
                topic_configs={"cleanup.policy": "compact"} if name in COMPACTED_TOPICS else {},
            )
            for name, count in topic_partitions(settings).items()
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another service was faster
                await admin.create_topics(missing)
        return [topic.name for topic in missing]
    finally:
        await admin.close()


def decode_payload(body: bytes) -> str:
    """A message body as text for a dead letter, whatever bytes it holds."""
    return body.decode("utf-8", errors="backslashreplace")


async def publish_dead_letter(
    broker: KafkaBroker,
    *,
    service: str,
    source_topic: str,
    body: bytes,
    error: Exception,
    request_id: str | None = None,
    attempts: int = 1,
) -> None:
    """Send an unprocessable message to the dead-letter topic with the reason."""
    letter = DeadLetter(
        request_id=request_id,
        attempts=attempts,
        source_topic=source_topic,
        service=service,
        error_type=type(error).__name__,
        reason=str(error)[:2000],
        payload=decode_payload(body),
    )
    await broker.publish(letter, topics.DEADLETTER)
    logger.warning("dead-lettered a message from %s: %s", source_topic, letter.reason[:200])


async def publish_result(broker: KafkaBroker, result: ChatResult, reply_to: ReplyRoute | None) -> None:
    """Publish a result to the results topic and, when someone waits for it, to their reply route."""
    key = result.request_id.encode()
    sends = [broker.publish(result, topics.RESULTS, key=key, correlation_id=result.request_id)]
    if reply_to is not None:
        sends.append(
            broker.publish(
                result, reply_to.topic, partition=reply_to.partition, key=key, correlation_id=result.request_id
            )
        )
    await asyncio.gather(*sends)  # both acknowledged (acks=all) before the caller commits


def rewind(consumer: Any, records: tuple[ConsumerRecord, ...]) -> None:
    """Seek every partition of the batch back to its earliest record, so the batch is read again."""
    earliest: dict[TopicPartition, int] = {}
    for record in records:
        partition = TopicPartition(record.topic, record.partition)
        earliest[partition] = min(record.offset, earliest.get(partition, record.offset))
    for partition, offset in earliest.items():
        consumer.seek(partition, offset)
