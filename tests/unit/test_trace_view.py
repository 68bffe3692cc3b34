"""The local trace view's layout (deploy/local/jaeger/ui/static/trace-view.mjs), run under node."""

from __future__ import annotations

from typing import Any

from tests.trace_view import span_rows

TRACE = "0af7651916cd43dd8448eb211c80319c"


def span(span_id: str, name: str, process: str, start: int, duration: int, **extra: Any) -> dict[str, Any]:
    return {"traceID": TRACE, "spanID": span_id, "operationName": name, "processID": process,
            "startTime": start, "duration": duration, "references": [], "tags": [], **extra}  # fmt: skip


def child_of(parent: str, trace: str = TRACE) -> list[dict[str, str]]:
    return [{"refType": "CHILD_OF", "traceID": trace, "spanID": parent}]


PROCESSES = {"p1": {"serviceName": "gateway"}, "p2": {"serviceName": "router"}, "p3": {"serviceName": "worker"}}


def test_rows_come_in_tree_order_with_depth_and_timing_relative_to_the_trace() -> None:
    trace = {
        "traceID": TRACE,
        "processes": PROCESSES,
        "spans": [  # deliberately out of order, as the query API may return them
            span("c2", "inference", "p3", 1_060, 30, references=child_of("c")),
            span("c", "run job", "p3", 1_040, 55, references=child_of("b")),
            span("a", "POST /v1/chat/completions", "p1", 1_000, 100),
            span("c1", "queue wait", "p3", 1_040, 20, references=child_of("c")),
            span("b", "route request", "p2", 1_010, 10, references=child_of("a")),
        ],
    }
    rows = span_rows(trace)
    assert [(row["service"], row["operation"], row["depth"]) for row in rows] == [
        ("gateway", "POST /v1/chat/completions", 0),
        ("router", "route request", 1),
        ("worker", "run job", 2),
        ("worker", "queue wait", 3),
        ("worker", "inference", 3),
    ]
    assert [row["offsetUs"] for row in rows] == [0, 10, 40, 40, 60]
    assert rows[0]["leftPct"] == 0 and rows[0]["widthPct"] == 100
    assert rows[2]["leftPct"] == 40 and rows[2]["widthPct"] == 55


def test_a_span_whose_parent_is_missing_is_shown_as_a_root_and_links_and_errors_are_kept() -> None:
    other = "1" * 32
    follows_from = {"refType": "FOLLOWS_FROM", "traceID": other, "spanID": "b"}
    failed = {"key": "otel.status_code", "type": "string", "value": "ERROR"}
    trace = {
        "traceID": TRACE,
        "processes": PROCESSES,
        "spans": [
            span("a", "POST /v1/chat/completions", "p1", 1_000, 100),
            span("x", "route request", "p2", 1_050, 10, references=child_of("gone")),  # parent not (yet) in Jaeger
            span("w", "run job", "p3", 1_070, 20, references=[follows_from], tags=[failed]),
        ],
    }
    rows = {row["operation"]: row for row in span_rows(trace)}
    assert rows["route request"]["depth"] == 0
    assert rows["run job"]["links"] == [{"traceID": other, "spanID": "b", "type": "FOLLOWS_FROM"}]
    assert rows["run job"]["error"] is True and rows["route request"]["error"] is False
