"""What a request may ask for and how much a key and this gateway may take.

- Per request: body size (413), message count and `max_tokens` per model (400).
- Per key: chat completions and tokens per minute, as sliding windows held in this process, so
  with several gateways each enforces its own share (429 with Retry-After).
- Per gateway: at most `max_in_flight` requests waiting for their results; beyond that 503 with a
  Retry-After estimated from the pools' backlog, instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.auth import Principal
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.protocol import GenerationParams
from shared.messages import ChatMessage
from shared.queue_lag import read_queue
from shared.settings import CommonSettings, ModelConfig

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 60
KAFKA_TIMEOUT_S = 3.0


# ------------------------------------------------------------------------------ per key, per minute


class SlidingWindow:
    """Amounts used within the last `window_s` seconds, against a limit."""

    def __init__(self, limit: int, window_s: float = WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0

    def used(self, now: float) -> int:
        """The amount used within the window ending at `now`."""
        while self._events and self._events[0][0] <= now - self.window_s:
            self._used -= self._events.popleft()[1]
        return self._used

    def retry_after(self, amount: int, now: float) -> float | None:
        """None when `amount` fits now, else the seconds until enough of the window has freed."""
        excess = self.used(now) + amount - self.limit
        if excess <= 0:
            return None
        if amount > self.limit:
            return self.window_s  # never fits: say so with a full window rather than a retry loop
        for at, used in self._events:
            excess -= used
            if excess <= 0:
                return at + self.window_s - now
        return self.window_s

    def add(self, amount: int, now: float) -> None:
        self.used(now)
        self._events.append((now, amount))
        self._used += amount


@dataclass(frozen=True)
class Rejection:
    """Why a request is refused and when it may come back."""

    reason: str
    message: str
    retry_after_s: float


class RateLimiter:
    """Requests and tokens per minute per key: the key's own limits, else the gateway's defaults."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.defaults = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._windows: dict[tuple[str, str], SlidingWindow] = {}

    def check(self, principal: Principal, tokens: int, now: float) -> Rejection | None:
        """A rejection when either window is full; records nothing."""
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            window = self._window(principal, kind)
            wait = None if window is None else window.retry_after(amount, now)
            if window is not None and wait is not None:
                message = f"Rate limit reached for {kind} per minute: limit {window.limit}"
                if kind == "tokens":
                    message += f", used {window.used(now)}, requested {amount} (prompt estimate + max_tokens)"
                return Rejection(f"rate_limit_{kind}", message, wait)
        return None

    def record(self, principal: Principal, tokens: int, now: float) -> None:
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            window = self._window(principal, kind)
            if window is not None:
                window.add(amount, now)

    def _window(self, principal: Principal, kind: str) -> SlidingWindow | None:
        own = principal.requests_per_minute if kind == "requests" else principal.tokens_per_minute
        limit = own or self.defaults[kind]
        if limit is None:
            return None
        window = self._windows.setdefault((principal.key_id, kind), SlidingWindow(limit))
        window.limit = limit  # the key's row may have changed since the window was made
        return window


# --------------------------------------------------------------------------------- per request


@dataclass(frozen=True)
class ModelBounds:
    """What one request to a model name may ask for (the loosest of the models that could serve it)."""

    max_messages: int
    max_output_tokens: int
    default_max_tokens: int


def candidate_models(settings: CommonSettings, model: str) -> list[ModelConfig]:
    """The models a request for `model` may run on: `auto` -> the routing pools', a pool -> its own."""
    if model == "auto":
        pools = dict.fromkeys((settings.routing.light_pool, settings.routing.heavy_pool))
        return [config for pool in pools for config in settings.pools[pool].models]
    if model in settings.pools:
        return list(settings.pools[model].models)
    found = settings.find_model(model)
    return [] if found is None else [found[1]]


def bounds_for(settings: GatewaySettings, model: str) -> ModelBounds | None:
    """The bounds of a model name; None for an unknown one (answered 404 later)."""
    models = candidate_models(settings, model)
    if not models:
        return None
    return ModelBounds(
        max_messages=max(config.max_messages or settings.gateway.limits.max_messages for config in models),
        max_output_tokens=max(config.max_output_tokens or config.max_context_tokens for config in models),
        default_max_tokens=max(config.default_max_tokens for config in models),
    )


def requested_tokens(body: GenerationParams) -> int | None:
    return body.output_limit()


def check_request(body: GenerationParams, bounds: ModelBounds) -> None:
    """400 when the request asks for more messages or tokens than its model allows."""
    messages, _ = body.prompt()
    if len(messages) > bounds.max_messages:
        raise ApiError(
            400,
            f"Too many messages: {len(messages)}, the most for '{body.model}' is {bounds.max_messages}",
            "invalid_request_error",
            "messages",
            "too_many_messages",
        )
    asked = requested_tokens(body)
    if asked is not None and asked > bounds.max_output_tokens:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(
            400,
            f"max_tokens is too large: {asked}, the most for '{body.model}' is {bounds.max_output_tokens}",
            "invalid_request_error",
            param,
            "max_tokens_too_large",
        )


def estimate_prompt_tokens(messages: list[ChatMessage]) -> int:
    """A tokenizer-free estimate: about 4 characters a token, plus each message's framing."""
    return sum(math.ceil(len(message.content) / 4) + 4 for message in messages) + 2


def token_cost(body: GenerationParams, bounds: ModelBounds | None) -> int:
    """What a request counts against tokens per minute at admission: prompt estimate + tokens asked for."""
    default = bounds.default_max_tokens if bounds is not None else 0
    return estimate_prompt_tokens(body.prompt()[0]) + (requested_tokens(body) or default)


# ---------------------------------------------------------------------------------- per gateway


class Backlog:
    """How long the pools need to work off what is queued (both lanes' lag) / recent completion rate."""

    def __init__(self, settings: CommonSettings, cache_s: float) -> None:
        self.settings = settings
        self.cache_s = cache_s
        self._lock = asyncio.Lock()
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._estimate: tuple[float, int] | None = None  # (measured at, seconds)
        self._last_sample: tuple[float, int] | None = None  # (measured at, committed offsets in total)
        self.local_completions: deque[float] = deque(maxlen=10_000)

    async def retry_after_s(self) -> int:
        """Seconds a client should wait before retrying, in [1, 60]; cached for `cache_s`."""
        async with self._lock:
            now = time.monotonic()
            if self._estimate is None or now - self._estimate[0] >= self.cache_s:
                self._estimate = (now, await self._measure(now))
            return self._estimate[1]

    async def _measure(self, now: float) -> int:
        try:
            async with asyncio.timeout(KAFKA_TIMEOUT_S):
                lag, committed = await self._read_offsets()
        except Exception as error:  # any Kafka trouble: still answer, with a cautious guess
            logger.warning("reading the pools' backlog failed: %r", error)
            return RETRY_AFTER_MAX_S // 4
        rate = self._completion_rate(now, committed)
        self._last_sample = (now, committed)
        seconds = lag / rate if rate > 0 else (RETRY_AFTER_MAX_S if lag else RETRY_AFTER_MIN_S)
        logger.info("backlog: %d jobs queued, %.2f completions/s -> retry after %.1f s", lag, rate, seconds)
        return int(min(max(math.ceil(seconds), RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S))

    def _completion_rate(self, now: float, committed: int) -> float:
        """Jobs per second committed by every pool since the last reading, else this gateway's own rate."""
        if self._last_sample is not None and 0 < now - self._last_sample[0] <= WINDOW_S:
            at, before = self._last_sample
            if committed > before:
                return (committed - before) / (now - at)
        recent = [at for at in self.local_completions if at > now - WINDOW_S]
        return len(recent) / WINDOW_S

    async def _read_offsets(self) -> tuple[int, int]:
        """(jobs not yet committed by their pool's workers, committed offsets summed) over every pool and lane."""
        admin, consumer = await self._clients()
        queues = [
            await read_queue(admin, consumer, pool, config.partitions) for pool, config in self.settings.pools.items()
        ]
        return sum(queue.lag for queue in queues), sum(queue.committed for queue in queues)

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        # Opened on the first overload only: a gateway that is never full never needs them.
        if self._admin is None or self._consumer is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
            consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
            await admin.start()
            await consumer.start()
            self._admin, self._consumer = admin, consumer
        return self._admin, self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()


class Admission:
    """Admits a chat completion past every limit, or refuses it with OpenAI's error and Retry-After."""

    def __init__(self, settings: GatewaySettings, registry: CollectorRegistry) -> None:
        limits = settings.gateway.limits
        self.settings = settings
        self.max_in_flight = limits.max_in_flight
        self.in_flight = 0
        self.rates = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute)
        self.backlog = Backlog(settings, limits.backlog_cache_s)
        self.rejections = Counter(
            "autoglm_gateway_rejections", "Requests refused by a limit, by reason", ["reason"], registry=registry
        )
        Gauge("autoglm_gateway_in_flight", "Chat completions waiting for their result", registry=registry).set_function(
            lambda: self.in_flight
        )

    async def acquire(self, principal: Principal, body: GenerationParams) -> Callable[[], None]:
        """Take one in-flight slot, or raise the 400/429/503 that says why not; returns its release."""
        bounds = bounds_for(self.settings, body.model)
        if bounds is not None:
            self._check_bounds(body, bounds)
        tokens = token_cost(body, bounds)
        now = time.monotonic()
        rejection = self.rates.check(principal, tokens, now)
        if rejection is not None:
            self.rejections.labels(rejection.reason).inc()
            raise rate_limited(rejection)
        if self.in_flight >= self.max_in_flight:
            self.rejections.labels("overloaded").inc()
            raise overloaded(self.max_in_flight, await self.backlog.retry_after_s())
        self.rates.record(principal, tokens, now)
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:  # a stream may be closed more than once
                released = True
                self.in_flight -= 1
                self.backlog.local_completions.append(time.monotonic())

        return release

    def _check_bounds(self, body: GenerationParams, bounds: ModelBounds) -> None:
        try:
            check_request(body, bounds)
        except ApiError as error:
            self.rejections.labels(error.info.code or "bad_request").inc()
            raise

    async def close(self) -> None:
        await self.backlog.close()


def rate_limited(rejection: Rejection) -> ApiError:
    retry_after = max(math.ceil(rejection.retry_after_s), RETRY_AFTER_MIN_S)
    return ApiError(
        429,
        f"{rejection.message}. Retry after {retry_after} s.",
        "rate_limit_error",  # OpenAI's type for 429s; the code says which limit kind of problem it is
        None,
        "rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def overloaded(max_in_flight: int, retry_after: int) -> ApiError:
    return ApiError(
        503,
        f"The gateway is at capacity ({max_in_flight} requests in flight); retry after {retry_after} s",
        "server_error",
        None,
        "overloaded",
        headers={"Retry-After": str(retry_after)},
    )


# ------------------------------------------------------------------------------------ body size


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` (declared or actually sent) gets OpenAI's 413."""

    def __init__(self, app: ASGIApp, max_bytes: int, rejections: Counter | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.rejections = rejections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # Read the whole body first (it is small by definition), so an oversized one that did not
        # declare its length is refused before anything parses it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.rejections is not None:
            self.rejections.labels("request_too_large").inc()
        error = ApiError(
            413,
            f"Request body too large: the limit is {self.max_bytes} bytes",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        await error.response()(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then whatever the client sends next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
