"""Tracing end to end: one request is one trace across the services, in Jaeger and in PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared import topics
from shared.messages import DeadLetter
from tests.e2e.harness import PORT_BASE, Stack, run_script
from tests.e2e.test_pipeline import plain_dsn, wait_for_assignment
from tests.trace_view import needs_node, rendered_page, span_rows, waterfall_rows

SERVICES = {"gateway", "router", "worker", "exporter"}


def ask(stack: Stack, content: str, base_url: str | None = None) -> str:
    """One chat completion through the gateway; returns the trace id it answered with."""
    response = httpx.post(
        f"{base_url or stack.gateway_url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 2},
        headers=stack.auth_headers,
        timeout=90,
    )
    assert response.status_code == 200, response.text
    trace_id = response.headers["X-Trace-Id"]
    assert len(trace_id) == 32
    return trace_id


def jaeger_trace(stack: Stack, trace_id: str) -> dict[str, Any] | None:
    """The trace as Jaeger's query API returns it, or None while it does not know it."""
    response = httpx.get(f"{stack.infra.jaeger_url}/api/traces/{trace_id}", timeout=10)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    data = response.json()["data"]
    return data[0] if data else None


def services_of(trace: dict[str, Any]) -> set[str]:
    return {trace["processes"][span["processID"]]["serviceName"] for span in trace["spans"]}


def span_named(trace: dict[str, Any], service: str, name: str) -> dict[str, Any]:
    for span in trace["spans"]:
        if span["operationName"] == name and trace["processes"][span["processID"]]["serviceName"] == service:
            return span
    raise AssertionError(f"no span {name!r} of {service} in {sorted(s['operationName'] for s in trace['spans'])}")


def wait_for_trace(stack: Stack, trace_id: str, wanted: set[str], limit_s: float = 60.0) -> dict[str, Any]:
    """Poll Jaeger until the trace holds the spans named in `wanted` ("service:span name")."""
    deadline = time.monotonic() + limit_s
    while True:
        trace = jaeger_trace(stack, trace_id)
        have = (
            {f"{trace['processes'][s['processID']]['serviceName']}:{s['operationName']}" for s in trace["spans"]}
            if trace
            else set()
        )
        if wanted <= have:
            assert trace is not None
            return trace
        if time.monotonic() > deadline:
            raise AssertionError(f"Jaeger has {sorted(have)} of trace {trace_id}, missing {sorted(wanted - have)}")
        time.sleep(0.5)


def parent_of(span: dict[str, Any]) -> str | None:
    refs = [ref["spanID"] for ref in span.get("references", []) if ref["refType"] == "CHILD_OF"]
    return refs[0] if refs else None


def ancestors(trace: dict[str, Any], span: dict[str, Any]) -> list[str]:
    """Service:name of every ancestor of `span`, nearest first; fails on a parent missing from the trace."""
    by_id = {item["spanID"]: item for item in trace["spans"]}
    chain, parent = [], parent_of(span)
    while parent is not None:
        assert parent in by_id, f"{span['operationName']} has a parent {parent} that is not in the trace"
        item = by_id[parent]
        chain.append(f"{trace['processes'][item['processID']]['serviceName']}:{item['operationName']}")
        parent = parent_of(item)
    return chain


REQUIRED = {
    "gateway:POST /v1/chat/completions",
    "router:route request",
    "worker:run job",
    "worker:queue wait",
    "worker:inference",
    "exporter:persist ChatRequest",
    "exporter:persist ChatResult",
}


def test_one_request_is_one_trace_in_jaeger_with_intact_parent_links(stack: Stack) -> None:
    trace_id = ask(stack, "follow me")
    trace = wait_for_trace(stack, trace_id, REQUIRED)
    assert services_of(trace) >= SERVICES
    roots = [span for span in trace["spans"] if parent_of(span) is None]
    assert [root["operationName"] for root in roots] == ["POST /v1/chat/completions"]

    # gateway -> router -> worker -> exporter, each hop through a Kafka record's headers.
    persisted = span_named(trace, "exporter", "persist ChatResult")
    chain = ancestors(trace, persisted)
    for hop in ("worker:run job", "router:route request", "gateway:POST /v1/chat/completions"):
        assert hop in chain, f"{hop} is not an ancestor of the persisted result: {chain}"
    assert (
        chain.index("worker:run job")
        < chain.index("router:route request")
        < chain.index("gateway:POST /v1/chat/completions")
    )
    run_job = span_named(trace, "worker", "run job")
    for child in ("queue wait", "inference"):
        assert parent_of(span_named(trace, "worker", child)) == run_job["spanID"]
    inference = span_named(trace, "worker", "inference")
    tags = {tag["key"]: tag["value"] for tag in inference["tags"]}
    assert tags["autoglm.batch_size"] >= 1 and tags["autoglm.model"] == "tiny-light"


def ask_streamed(stack: Stack, content: str) -> str:
    """One streamed chat completion through the gateway, read to its end; returns its trace id."""
    body = {"model": "tiny-light", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "stream": True}
    url = f"{stack.gateway_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=stack.auth_headers, timeout=90) as response:
        assert response.status_code == 200, response.read()
        assert "data: [DONE]" in "".join(response.iter_text())
        return response.headers["X-Trace-Id"]


def orphans(trace: dict[str, Any]) -> list[str]:
    """Spans whose parent is not in the trace (a trace that is not one tree)."""
    ids = {span["spanID"] for span in trace["spans"]}
    return [span["operationName"] for span in trace["spans"] if parent_of(span) not in ids | {None}]


def jaeger_traces(stack: Stack, service: str, start_us: int) -> list[dict[str, Any]]:
    """Every trace Jaeger has with a span of `service` since `start_us`."""
    query = {"service": service, "start": start_us, "end": int(time.time() * 1e6), "limit": 1000}
    response = httpx.get(f"{stack.infra.jaeger_url}/api/traces", params=query, timeout=30)
    response.raise_for_status()
    return list(response.json()["data"] or [])


def test_a_streamed_request_is_one_tree_and_no_batch_lists_a_trace_of_its_own(stack: Stack) -> None:
    start_us = int(time.time() * 1e6)
    trace_id = ask_streamed(stack, "stream me")
    deadline = time.monotonic() + 60
    while orphans(trace := wait_for_trace(stack, trace_id, REQUIRED)):  # each service's spans come at their pace
        assert time.monotonic() < deadline, f"{orphans(trace)} have parents that are not in trace {trace_id}"
        time.sleep(0.5)
    assert [span["operationName"] for span in trace["spans"] if parent_of(span) is None] == [
        "POST /v1/chat/completions"
    ]
    # The chunks the worker streamed are published in the request's trace (not the batch's): at least
    # one besides the result's.
    reply_publishes = [span for span in trace["spans"] if span["operationName"] == f"{topics.REPLIES} publish"]
    assert len(reply_publishes) >= 2, sorted(span["operationName"] for span in trace["spans"])

    # The router and the worker consumed the request in batches; no batch has a trace of its own.
    for service in ("router", "worker"):
        traces = jaeger_traces(stack, service, start_us)
        assert trace_id in {item["traceID"] for item in traces}
        for item in traces:
            batch_spans = [
                span["operationName"]
                for span in item["spans"]
                if {tag["key"] for tag in span["tags"]} >= {"messaging.batch.message_count"}
                and {"key": "span.kind", "type": "string", "value": "consumer"} in span["tags"]
            ]
            assert not batch_spans, f"{service}: trace {item['traceID']} holds batch spans {batch_spans}"


def test_the_trace_view_jaeger_serves_lays_the_request_out_across_the_four_services(stack: Stack) -> None:
    needs_node()
    trace_id = ask(stack, "show me")
    trace = wait_for_trace(stack, trace_id, REQUIRED)
    page = httpx.get(f"{stack.infra.jaeger_url}/trace/{trace_id}", timeout=10)
    assert page.status_code == 200 and "Open-AutoGLM traces" in page.text
    assert httpx.get(f"{stack.infra.jaeger_url}/static/trace-view.mjs", timeout=10).status_code == 200

    rows = span_rows(trace)
    assert len(rows) == len(trace["spans"]) and {row["service"] for row in rows} >= SERVICES
    assert (rows[0]["service"], rows[0]["operation"], rows[0]["depth"]) == ("gateway", "POST /v1/chat/completions", 0)
    depth = {(row["service"], row["operation"]): row["depth"] for row in rows}
    assert 0 < depth[("router", "route request")] < depth[("worker", "run job")] < depth[("worker", "inference")]
    assert all(row["leftPct"] >= 0 and row["leftPct"] + row["widthPct"] <= 100.5 for row in rows)


def test_the_trace_view_shows_the_request_in_a_browser(stack: Stack) -> None:
    trace_id = ask(stack, "draw me")
    trace = wait_for_trace(stack, trace_id, REQUIRED)
    found = rendered_page(f"{stack.infra.jaeger_url}/search?service=gateway&lookback=15m&limit=1000")
    assert f'href="trace/{trace_id}"' in found  # the search lists it, linked to its trace page

    shown = waterfall_rows(rendered_page(f"{stack.infra.jaeger_url}/trace/{trace_id}"))
    assert len(shown) == len(trace["spans"])
    assert shown[0] == ("gateway", "POST /v1/chat/completions")
    assert {service for service, _ in shown} >= SERVICES
    assert ("exporter", "persist ChatResult") in shown


async def stored_spans(stack: Stack, trace_id: str) -> dict[str, asyncpg.Record]:
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        rows = await connection.fetch("SELECT * FROM spans WHERE trace_id = $1", trace_id)
    finally:
        await connection.close()
    return {row["span_id"]: row for row in rows}


async def test_the_spans_jaeger_shows_are_stored_in_postgresql(stack: Stack) -> None:
    trace_id = await asyncio.to_thread(ask, stack, "store my spans")
    trace = await asyncio.to_thread(wait_for_trace, stack, trace_id, REQUIRED)
    stored = await stored_spans(stack, trace_id)  # the exporter forwards only what it committed
    for span in trace["spans"]:
        row = stored.get(span["spanID"])
        assert row is not None, f"{span['operationName']} is in Jaeger but not in PostgreSQL"
        assert row["name"] == span["operationName"]
        assert row["parent_span_id"] == parent_of(span)
        assert row["service"] == trace["processes"][span["processID"]]["serviceName"]
        tags = {tag["key"]: tag["value"] for tag in span["tags"]}
        attributes = json.loads(row["attributes"])
        assert attributes.items() <= tags.items(), f"{span['operationName']}: stored {attributes}, Jaeger has {tags}"
    root = next(row for row in stored.values() if row["parent_span_id"] is None)
    assert root["service"] == "gateway" and root["kind"] == "server"
    worker_rows = [row for row in stored.values() if row["service"] == "worker" and row["name"] == "run job"]
    assert json.loads(worker_rows[0]["attributes"])["autoglm.pool"] == "light"


async def test_a_record_on_the_spans_topic_that_is_not_otlp_is_dead_lettered(stack: Stack) -> None:
    bootstrap = stack.infra.kafka_bootstrap
    consumer = AIOKafkaConsumer(
        topics.DEADLETTER, bootstrap_servers=bootstrap, group_id=f"test-{uuid.uuid4()}", auto_offset_reset="latest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    marker = uuid.uuid4().hex
    await consumer.start()
    await producer.start()
    try:
        await wait_for_assignment(consumer)
        await producer.send_and_wait(topics.SPANS, b"\xff\xff not protobuf " + marker.encode())
        async with asyncio.timeout(60):
            async for record in consumer:
                letter = DeadLetter.model_validate_json(record.value)
                if marker in letter.payload:
                    break
    finally:
        await producer.stop()
        await consumer.stop()
    assert letter.service == "exporter" and letter.source_topic == topics.SPANS
    assert letter.error_type == "DecodeError"
    # ... and the spans topic keeps flowing: a new request's spans still arrive.
    trace_id = await asyncio.to_thread(ask, stack, "after the garbage")
    await asyncio.to_thread(wait_for_trace, stack, trace_id, {"exporter:persist ChatResult"})


@pytest.mark.timeout(300)
async def test_spans_can_go_straight_to_jaeger_instead_of_the_bus(stack: Stack) -> None:
    port = PORT_BASE + 130
    settings = {"AUTOGLM_TELEMETRY__SPANS": "otlp"}
    with stack.extra_gateway("gateway-otlp", port, instance=6, **settings):
        trace_id = await asyncio.to_thread(ask, stack, "direct", f"http://127.0.0.1:{port}")
        # The other services' spans come through the bus, each at its own pace: wait for all of them.
        trace = await asyncio.to_thread(wait_for_trace, stack, trace_id, REQUIRED)
    assert services_of(trace) >= SERVICES
    stored = await stored_spans(stack, trace_id)
    # The other services still use the bus; only this gateway's spans skipped PostgreSQL.
    assert stored and "gateway" not in {row["service"] for row in stored.values()}


def forward_failures(stack: Stack) -> float:
    """The exporter's count of span batches it gave up forwarding."""
    exporter = next(service for service in stack.services if service.name == "exporter")
    text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10).text
    samples = [
        line.split()[-1] for line in text.splitlines() if line.startswith("autoglm_spans_forward_failures_total")
    ]
    return float(samples[0]) if samples else 0.0


async def wait_for_stored(stack: Stack, trace_id: str, wanted: set[str], limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        have = {f"{row['service']}:{row['name']}" for row in (await stored_spans(stack, trace_id)).values()}
        if wanted <= have:
            return
        assert time.monotonic() < deadline, f"PostgreSQL has {sorted(have)} of {trace_id}, missing {wanted - have}"
        await asyncio.sleep(0.5)


@pytest.mark.timeout(300)
async def test_with_jaeger_down_spans_still_reach_postgresql_and_the_lost_forwards_are_counted(stack: Stack) -> None:
    before = await asyncio.to_thread(forward_failures, stack)
    await asyncio.to_thread(run_script, "jaeger.sh", "stop")
    try:
        trace_id = await asyncio.to_thread(ask, stack, "while Jaeger is away")
        await wait_for_stored(stack, trace_id, REQUIRED)
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(forward_failures, stack) <= before:
            assert time.monotonic() < deadline, "no forwarding failure counted"
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(run_script, "jaeger.sh", "start")
    # The exporter did not stall: the next request's trace reaches the new Jaeger.
    trace_id = await asyncio.to_thread(ask, stack, "Jaeger is back")
    await asyncio.to_thread(wait_for_trace, stack, trace_id, REQUIRED)
