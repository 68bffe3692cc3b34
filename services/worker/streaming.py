"""Streaming: the text of a running request goes to its caller's reply partition as it is generated.

Each streamed request of a batch gets a `ChatChunk` sender that publishes its deltas in order, one
send at a time; deltas that arrive while a send is in flight are joined into the next chunk, so a
slow broker means fewer, larger chunks rather than a growing queue. Every chunk is sent before the
request's result (the batch flushes its streams first), and all go to the same partition, so the
gateway reads them in order. A chunk that cannot be sent is dropped with a warning: the result still
carries the whole text. Chunks are published in their job's trace (its record's context), not the batch's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker

from shared.messages import ChatChunk, RoutedJob
from shared.telemetry import in_trace, record_context

logger = logging.getLogger(__name__)


class ChunkSender:
    """Publishes one request's deltas as numbered chunks of one run (`stream_id`)."""

    def __init__(self, broker: KafkaBroker, job: RoutedJob, record: ConsumerRecord) -> None:
        assert job.request.reply_to is not None
        self.broker = broker
        self.job = job
        self.trace = record_context(record)
        self.route = job.request.reply_to
        self.stream_id = uuid.uuid4().hex
        self.seq = 0
        self.pending: list[str] = []
        self.sending: asyncio.Task[None] | None = None

    def add(self, delta: str) -> None:
        self.pending.append(delta)
        if self.sending is None or self.sending.done():
            self.sending = asyncio.create_task(self._send_pending())

    async def flush(self) -> None:
        """Wait until every delta given so far is sent (or given up)."""
        while self.sending is not None and not self.sending.done():
            await self.sending

    async def _send_pending(self) -> None:
        while self.pending:
            delta, self.pending = "".join(self.pending), []
            chunk = ChatChunk(
                request_id=self.job.request_id,
                stream_id=self.stream_id,
                seq=self.seq,
                delta=delta,
                model=self.job.model,
            )
            self.seq += 1
            try:
                with in_trace(self.trace):
                    await self.broker.publish(
                        chunk, self.route.topic, partition=self.route.partition, key=self.job.request_id.encode()
                    )
            except Exception as error:
                logger.warning(
                    "a chunk of %s was not sent (%s); its result will carry the text", chunk.request_id, error
                )


class StreamRelay:
    """The `on_delta` of a batch: routes each delta to its request's sender."""

    def __init__(self, broker: KafkaBroker, jobs: list[tuple[RoutedJob, ConsumerRecord]]) -> None:
        self.senders = {job.request_id: ChunkSender(broker, job, record) for job, record in jobs if wants_stream(job)}

    def __call__(self, request_id: str, delta: str) -> None:
        if (sender := self.senders.get(request_id)) is not None:
            sender.add(delta)

    async def flush(self) -> None:
        """Send every pending chunk: call before publishing the batch's results."""
        await asyncio.gather(*(sender.flush() for sender in self.senders.values()))


def wants_stream(job: RoutedJob) -> bool:
    """A job is streamed when its caller asked for it and waits on a reply route."""
    return job.request.stream and job.request.reply_to is not None
