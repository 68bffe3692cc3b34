"""The gateway's subscriber: results and stream chunks arriving on this instance's reply partition."""

from __future__ import annotations

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TopicPartition

from services.gateway.config import GatewaySettings
from services.gateway.replies import ReplyWaiters
from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS
from shared.messages import Reply


def register_handlers(broker: KafkaBroker, settings: GatewaySettings, waiters: ReplyWaiters) -> None:
    """Read partition `instance` of the replies topic (assigned, no consumer group)."""

    @broker.subscriber(
        partitions=[TopicPartition(topics.REPLIES, settings.gateway.instance, declare=False)],
        auto_offset_reset="latest",  # replies from before this start have no waiter here
        ack_policy=AckPolicy.ACK_FIRST,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        title=f"replies for gateway {settings.gateway.instance}",
    )
    async def receive_reply(reply: Reply) -> None:
        """Wake the HTTP request waiting for this result, or feed its stream."""
        waiters.deliver(reply)
