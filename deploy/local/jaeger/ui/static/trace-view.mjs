// What the trace page draws, computed from a trace as Jaeger's query API returns it
// (GET /api/traces/{id}: spans with µs start times and CHILD_OF / FOLLOWS_FROM references).
// No DOM here, so the layout can be checked with node against a real trace.

/** The span's parent inside this trace, or null for a root (or a parent Jaeger does not have). */
function parentId(span, known) {
  const ref = (span.references || []).find((r) => r.refType === "CHILD_OF" && r.traceID === span.traceID);
  return ref && known.has(ref.spanID) ? ref.spanID : null;
}

function serviceOf(trace, span) {
  const process = trace.processes[span.processID];
  return process ? process.serviceName : "?";
}

function tagMap(span) {
  return Object.fromEntries((span.tags || []).map((tag) => [tag.key, tag.value]));
}

function isError(tags) {
  return tags.error === true || tags.error === "true" || tags["otel.status_code"] === "ERROR";
}

/**
 * One row per span in tree order (parents before children, siblings by start time), each with its
 * depth, service, timing relative to the trace's start and its place on the timeline in percent.
 */
export function spanRows(trace) {
  const spans = trace.spans || [];
  const known = new Set(spans.map((s) => s.spanID));
  const children = new Map();
  const roots = [];
  for (const span of spans) {
    const parent = parentId(span, known);
    if (parent === null) roots.push(span);
    else children.set(parent, [...(children.get(parent) || []), span]);
  }
  const start = Math.min(...spans.map((s) => s.startTime));
  const end = Math.max(...spans.map((s) => s.startTime + s.duration));
  const total = Math.max(end - start, 1);
  const byStart = (a, b) => a.startTime - b.startTime;
  const rows = [];
  const visit = (span, depth) => {
    const tags = tagMap(span);
    const links = (span.references || []).filter((r) => r.refType !== "CHILD_OF" || r.traceID !== span.traceID);
    rows.push({
      spanID: span.spanID,
      depth,
      service: serviceOf(trace, span),
      operation: span.operationName,
      offsetUs: span.startTime - start,
      durationUs: span.duration,
      leftPct: (100 * (span.startTime - start)) / total,
      widthPct: Math.max((100 * span.duration) / total, 0.2),
      error: isError(tags),
      tags,
      links: links.map((r) => ({ traceID: r.traceID, spanID: r.spanID, type: r.refType })),
    });
    for (const child of (children.get(span.spanID) || []).sort(byStart)) visit(child, depth + 1);
  };
  for (const root of roots.sort(byStart)) visit(root, 0);
  return rows;
}

/** The line the search page shows for a trace. */
export function traceSummary(trace) {
  const rows = spanRows(trace);
  const root = rows.find((row) => row.depth === 0) || rows[0];
  const start = Math.min(...trace.spans.map((s) => s.startTime));
  const end = Math.max(...trace.spans.map((s) => s.startTime + s.duration));
  return {
    traceID: trace.traceID,
    root: root ? `${root.service}: ${root.operation}` : "(no spans)",
    startUs: start,
    durationUs: end - start,
    spanCount: rows.length,
    services: [...new Set(rows.map((row) => row.service))].sort(),
    errors: rows.filter((row) => row.error).length,
  };
}

/** 1234 µs -> "1.23 ms"; microseconds in, the unit a person reads out. */
export function formatDuration(us) {
  if (us < 1000) return `${Math.round(us)} µs`;
  if (us < 1_000_000) return `${(us / 1000).toFixed(us < 10_000 ? 2 : 1)} ms`;
  return `${(us / 1_000_000).toFixed(2)} s`;
}
