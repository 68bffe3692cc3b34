"""`Idempotency-Key`: a retried POST gets the first request's outcome instead of running it twice.

The request id is derived from (caller, key), so every gateway instance, and this one after a
restart, names the retry exactly as the first attempt. Then, in order:
1. this gateway is already handling (or just handled) that id: share that attempt's outcome;
2. PostgreSQL has the result: rebuild the same completion from it;
3. PostgreSQL has the request but no result yet: poll until the result lands or the timeout;
4. nobody has seen it: publish it as new.
The same key with another body is refused (422). Two first attempts on two gateways within the
exporter's write delay both pass step 4: the work runs twice, the tables keep the first row.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from services.gateway.errors import ApiError
from services.gateway.protocol import GenerationParams
from services.gateway.serving import ChatService
from services.gateway.tracking import fetch_request, result_from_row
from shared.logging import bound_request_id
from shared.messages import ChatRequest, ChatResult

logger = logging.getLogger(__name__)

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
POLL_INTERVAL_S = 0.2
REMEMBER_S = 60.0  # a finished attempt is shared this long: PostgreSQL learns of it a little later
SIGNED_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def idempotent_request_id(caller: str | None, key: str) -> str:
    """The request id of `key` for `caller`: the same on every gateway, and after restarts."""
    digest = hashlib.sha256(json.dumps([caller or "", key]).encode()).hexdigest()
    return f"chatcmpl-{digest[:32]}"


def check_key(key: str) -> str:
    """The key itself; 400 when it is empty, too long or not printable ASCII."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise ApiError(
            400,
            f"The {KEY_HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            "invalid_request_error",
            KEY_HEADER,
            "invalid_idempotency_key",
        )
    return key


def signature(request: ChatRequest) -> dict[str, Any]:
    """What a retry must repeat exactly: model, messages and sampling (not deadline or reply route)."""
    params = request.model_dump(mode="json", include=set(SIGNED_PARAMS))
    # The exporter stores NUL as U+FFFD (PostgreSQL text cannot hold it), so compare it that way.
    messages = [{"role": m.role, "content": m.content.replace("\x00", "\ufffd")} for m in request.messages]
    return {"model": request.model, "messages": messages, "params": params, "user": request.user}


def stored_signature(row: RowMapping) -> dict[str, Any]:
    """The signature of a stored `requests` row."""
    params = {name: row["params"].get(name) for name in SIGNED_PARAMS}
    return {"model": row["model"], "messages": row["messages"], "params": params, "user": row["end_user"]}


def key_reused() -> ApiError:
    return ApiError(
        422,
        f"This {KEY_HEADER} was already used with a different request body",
        "invalid_request_error",
        KEY_HEADER,
        "idempotency_key_reused",
    )


@dataclass(frozen=True)
class Outcome:
    """What a POST with a key gets: a result, or none yet (queued or still running)."""

    request_id: str
    created_at: datetime
    result: ChatResult | None
    replayed: bool  # True: an earlier attempt's outcome, not this POST's own work


@dataclass
class Attempt:
    """The first attempt at an id on this gateway, shared with the retries that arrive meanwhile."""

    signature: dict[str, Any]
    task: asyncio.Task[Outcome]


class IdempotentCompletions:
    """Runs chat completions that carry an Idempotency-Key at most once."""

    def __init__(self, chat: ChatService, engine: AsyncEngine) -> None:
        self.chat = chat
        self.engine = engine
        self.attempts: dict[str, Attempt] = {}

    async def run(self, body: GenerationParams, key: str, caller: str | None, *, wait: bool) -> Outcome:
        """The outcome of `body` under `key`; with `wait`, always a result (or a 504)."""
        request = self.chat.build_request(body, idempotent_request_id(caller, check_key(key)), wait=wait, caller=caller)
        with bound_request_id(request.request_id):
            attempt = self.attempts.get(request.request_id)
            if attempt is None:
                attempt = self.start(request, wait)
                replayed = False
            elif attempt.signature != signature(request):
                raise key_reused()
            else:
                replayed = True
                logger.info("retry of a request this gateway is handling")
            if not wait and replayed and not attempt.task.done():
                return Outcome(request.request_id, request.created_at, None, replayed)  # async: no waiting
            outcome = await asyncio.shield(attempt.task)  # a client that leaves does not stop the attempt
            if wait and outcome.result is None:
                outcome = Outcome(request.request_id, outcome.created_at, await self.poll_result(request), True)
            return Outcome(outcome.request_id, outcome.created_at, outcome.result, outcome.replayed or replayed)

    def start(self, request: ChatRequest, wait: bool) -> Attempt:
        """Begin the first attempt at `request` and remember it while retries may come."""
        attempt = Attempt(signature(request), asyncio.create_task(self.first_attempt(request, wait)))
        self.attempts[request.request_id] = attempt

        def settled(task: asyncio.Task[Outcome]) -> None:
            failed = task.cancelled() or task.exception() is not None  # also marks the exception as seen
            delay_s = 0.0 if failed else REMEMBER_S  # after a failure a retry must look again
            asyncio.get_running_loop().call_later(delay_s, self.forget, request.request_id, attempt)

        attempt.task.add_done_callback(settled)
        return attempt

    def forget(self, request_id: str, attempt: Attempt) -> None:
        if self.attempts.get(request_id) is attempt:
            del self.attempts[request_id]

    async def first_attempt(self, request: ChatRequest, wait: bool) -> Outcome:
        """Replay what PostgreSQL knows of this id, else publish the request as new."""
        with bound_request_id(request.request_id):
            stored = await fetch_request(self.engine, request.request_id)
            if stored is not None:
                if stored.request is not None and stored_signature(stored.request) != signature(request):
                    raise key_reused()
                created_at = stored.request["created_at"] if stored.request is not None else request.created_at
                result = result_from_row(stored.result) if stored.result is not None else None
                logger.info("replaying a stored request (%s)", "finished" if result else "unfinished")
                return Outcome(request.request_id, created_at, result, replayed=True)
            if wait:
                result = await self.chat.round_trip(request, self.chat.settings.gateway.request_timeout_s)
                return Outcome(request.request_id, request.created_at, result, replayed=False)
            await self.chat.submit(request)
            return Outcome(request.request_id, request.created_at, None, replayed=False)

    async def poll_result(self, request: ChatRequest) -> ChatResult:
        """Wait for an earlier attempt's result to be stored; 504 as a waiting POST would get."""
        timeout_s = self.chat.settings.gateway.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    stored = await fetch_request(self.engine, request.request_id)
                    if stored is not None and stored.result is not None:
                        return result_from_row(stored.result)
                    await asyncio.sleep(POLL_INTERVAL_S)
        except TimeoutError:
            raise ApiError(
                504, f"The request did not complete within {timeout_s:g} s", "timeout", None, "deadline_exceeded"
            ) from None
