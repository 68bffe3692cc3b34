"""Message contracts: validation that producers in any language rely on."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pydantic import ValidationError

from shared import topics
from shared.asyncapi import build_asyncapi
from shared.messages import SCHEMA_VERSION, ChatMessage, ChatRequest, utcnow


def test_a_minimal_request_gets_an_id_a_version_and_a_timestamp() -> None:
    request = ChatRequest.model_validate_json('{"messages": [{"role": "user", "content": "hi"}]}')
    assert request.request_id.startswith("chatcmpl-") and request.schema_version == SCHEMA_VERSION
    assert request.model == "auto" and request.created_at.tzinfo is not None


@pytest.mark.parametrize(
    "body",
    [
        '{"messages": []}',
        '{"messages": [{"role": "robot", "content": "hi"}]}',
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}',
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
    ],
)
def test_invalid_requests_are_refused(body: str) -> None:
    with pytest.raises(ValidationError):
        ChatRequest.model_validate_json(body)


def test_deadline() -> None:
    request = ChatRequest(messages=[ChatMessage(role="user", content="hi")], deadline=utcnow() + timedelta(seconds=1))
    assert not request.is_expired()
    assert request.is_expired(utcnow() + timedelta(seconds=2))


def test_unknown_fields_from_newer_producers_are_ignored() -> None:
    body = '{"messages": [{"role": "user", "content": "hi"}], "future_field": 1}'
    assert ChatRequest.model_validate_json(body).messages[0].content == "hi"


def test_the_asyncapi_document_covers_every_topic_and_the_stream_chunks() -> None:
    document = json.dumps(build_asyncapi())
    for topic in (
        topics.REQUESTS,
        topics.RESULTS,
        topics.REPLIES,
        topics.CONTROL,
        topics.FEEDBACK,
        topics.REGISTRY,
        topics.SPANS,
    ):
        assert topic in document
    assert "ChatChunk" in document and "ChatResult" in document  # what a gateway's reply partition carries
