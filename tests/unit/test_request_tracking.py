"""Request tracking logic that needs no broker: ids from keys, signatures, stored rows, headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from pydantic import ValidationError

from services.exporter.parsing import trace_id_of
from services.exporter.store import request_row, result_row, without_nul
from services.gateway.api import Delivery
from services.gateway.errors import ApiError
from services.gateway.idempotency import check_key, idempotent_request_id, signature, stored_signature
from services.gateway.protocol import ChatCompletionRequest, ChatCompletionResponse
from services.gateway.tracking import StoredRequest, request_status, result_from_row, state_of
from shared.messages import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    Choice,
    ErrorInfo,
    Feedback,
    Timings,
    Usage,
    utcnow,
)


def as_stored(row: dict[str, Any]) -> dict[str, Any]:
    """What PostgreSQL gives back: NUL replaced as the exporter stores it, JSON columns through JSON."""
    stored = without_nul(row)
    return {
        key: json.loads(json.dumps(value)) if isinstance(value, list | dict) else value for key, value in stored.items()
    }


def test_prefer_respond_async_is_recognised_among_other_preferences() -> None:
    def waits(prefer: str | None) -> bool:
        return Delivery(cache_control=None, prefer=prefer, idempotency_key=None).wait

    assert not waits("respond-async")
    assert not waits("return=minimal, Respond-Async; wait=10")
    assert waits(None) and waits("return=representation")


def test_a_key_names_the_same_request_for_the_same_caller_only() -> None:
    first = idempotent_request_id(None, "order-42")
    assert first == idempotent_request_id(None, "order-42") and first.startswith("chatcmpl-")
    assert first != idempotent_request_id("key-1", "order-42") != idempotent_request_id(None, "order-43")
    assert len(first) == len("chatcmpl-") + 32


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "line\nbreak"])
def test_an_unusable_key_is_a_400_naming_the_header(key: str) -> None:
    with pytest.raises(ApiError) as raised:
        check_key(key)
    assert raised.value.status == 400 and raised.value.info.param == "Idempotency-Key"


def request_for(body: dict[str, Any]) -> ChatRequest:
    return ChatCompletionRequest.model_validate(body).to_chat_request("chatcmpl-x", utcnow(), None)


def test_a_stored_request_has_the_signature_of_the_body_it_came_from() -> None:
    body = {"messages": [{"role": "user", "content": "a\x00b"}], "temperature": 0.7, "stop": "x", "max_tokens": 5}
    request = request_for(body)
    assert stored_signature(as_stored(request_row(request))) == signature(request)
    changed = request_for({**body, "temperature": 0.8})
    assert stored_signature(as_stored(request_row(request))) != signature(changed)


def result(**fields: Any) -> ChatResult:
    return ChatResult(
        request_id="chatcmpl-r",
        model="tiny-light",
        pool="light",
        score=0.2,
        reasons=["score 0.20 < threshold 0.5"],
        attempts=2,
        usage=Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
        timings=Timings(queue_ms=1.5, inference_ms=2.5, total_ms=4.0, batch_size=2),
        created_at=utcnow(),
        **fields,
    )


def test_a_stored_result_rebuilds_the_same_completion() -> None:
    original = result(choices=[Choice(message=ChatMessage(role="assistant", content="hello"), finish_reason="length")])
    rebuilt = result_from_row(as_stored(result_row(original)))  # type: ignore[arg-type]
    assert ChatCompletionResponse.from_result(rebuilt) == ChatCompletionResponse.from_result(original)
    assert rebuilt.attempts == 2 and rebuilt.reasons == original.reasons and rebuilt.timings == original.timings


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (None, "completed"),
        (ErrorInfo(type="cancelled", code="request_cancelled", message="m"), "cancelled"),
        (ErrorInfo(type="timeout", code="deadline_exceeded", message="m"), "expired"),
        (ErrorInfo(type="server_error", code="retries_exhausted", message="m"), "failed"),
        (ErrorInfo(type="invalid_request_error", code="model_not_found", message="m"), "failed"),
    ],
)
def test_each_outcome_has_its_status(error: ErrorInfo | None, state: str) -> None:
    stored = result_from_row(as_stored(result_row(result(error=error))))  # type: ignore[arg-type]
    assert state_of(stored) == state
    assert state_of(None) == "queued"


def test_a_failed_request_reports_its_error_and_no_result() -> None:
    failed = result(error=ErrorInfo(type="server_error", code="retries_exhausted", message="gave up"))
    status = request_status(StoredRequest(None, as_stored(result_row(failed))))  # type: ignore[arg-type]
    assert status.status == "failed" and status.result is None
    assert status.error is not None and status.error.code == "retries_exhausted" and status.error.message == "gave up"
    assert status.routing is not None and status.routing.pool == "light" and status.attempts == 2


def record(headers: list[tuple[str, bytes]]) -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord("t", 0, 0, 0, 0, None, b"{}", None, 0, 2, headers)


def test_the_trace_id_comes_from_the_traceparent_header() -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of(record([("traceparent", f"00-{trace}-00f067aa0ba902b7-01".encode())])) == trace
    assert trace_id_of(record([])) is None
    assert trace_id_of(record([("traceparent", b"garbage")])) is None
    assert trace_id_of(record([("traceparent", f"00-{'0' * 32}-00f067aa0ba902b7-01".encode())])) is None


@pytest.mark.parametrize("fields", [{"score": 1.5}, {"score": -1.01}, {"score": 0, "comment": "x" * 2001}, {}])
def test_feedback_outside_its_bounds_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Feedback(request_id="chatcmpl-x", **fields)
    assert Feedback(request_id="chatcmpl-x", score=-1).feedback_id.startswith("fb-")
