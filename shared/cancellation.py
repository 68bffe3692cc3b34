"""Cancelled request ids, learnt from the control topic by every router and worker instance.

Each instance reads the whole control topic from the moment it starts (no consumer group, so
every instance sees every cancellation) and remembers ids for `remember_s`; a request is skipped
if it reaches an instance after its cancellation did. A request already running on an engine that
decodes step by step (torch) stops at its next token; others finish, and their answer is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TopicPartition

from shared import topics
from shared.kafka import FETCH_MAX_WAIT_MS
from shared.messages import CancelRequest

logger = logging.getLogger(__name__)


class CancelledRequests:
    """A bounded, expiring set of cancelled request ids."""

    def __init__(
        self, remember_s: float = 3600.0, capacity: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.remember_s = remember_s
        self.capacity = capacity
        self.clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> None:
        """Remember a cancellation (the oldest is forgotten when full)."""
        self._until[request_id] = self.clock() + self.remember_s
        self._until.move_to_end(request_id)
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        until = self._until.get(request_id) if isinstance(request_id, str) else None
        if until is None:
            return False
        if until < self.clock():
            self._until.pop(request_id, None)  # type: ignore[call-overload]  # also read from engine threads
            return False
        return True

    def subscribe(self, broker: KafkaBroker, service: str) -> None:
        """Learn cancellations from the control topic on `broker`."""

        @broker.subscriber(
            partitions=[TopicPartition(topics.CONTROL, 0, declare=False)],  # assigned: every instance reads all
            auto_offset_reset="latest",
            ack_policy=AckPolicy.ACK_FIRST,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            title=f"cancellations seen by {service}",
        )
        async def learn_cancellation(cancel: CancelRequest) -> None:
            """Remember that this request must not run."""
            self.add(cancel.request_id)
            logger.info("request %s cancelled: %s", cancel.request_id, cancel.reason)
