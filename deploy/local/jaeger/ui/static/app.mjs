// The trace view's pages: /search (recent traces of a service) and /trace/<id> (one trace's
// spans as a waterfall). Everything comes from Jaeger's query API on the same origin.
import { formatDuration, spanRows, traceSummary } from "./trace-view.mjs";

const page = document.getElementById("page");

/** An element with attributes and children (strings become text nodes, so nothing is parsed as HTML). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

async function api(path) {
  const response = await fetch(path);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const reason = (body.errors || []).map((e) => e.msg).join("; ") || response.statusText;
    throw new Error(`${path}: ${response.status} ${reason}`);
  }
  return body.data;
}

function showError(error) {
  page.replaceChildren(el("p", { class: "error" }, String(error.message || error)));
}

const PALETTE = ["#3b82c4", "#e08a1e", "#4caf50", "#9c4dc4", "#d0455b", "#1fa6a0", "#8a6d3b", "#607d8b"];
const OUR_SERVICES = ["gateway", "router", "worker", "exporter"];

/** One colour per service, the same on every page: ours fixed, any other by a hash of its name. */
function colourOf(service) {
  const ours = OUR_SERVICES.indexOf(service);
  if (ours >= 0) return PALETTE[ours];
  let hash = 0;
  for (const char of service) hash = (hash * 31 + char.charCodeAt(0)) % 997;
  return PALETTE[OUR_SERVICES.length + (hash % (PALETTE.length - OUR_SERVICES.length))];
}

/** Where a bar's duration goes: after the bar, before it, or inside it when neither side has room. */
function durationStyle(row) {
  const end = row.leftPct + row.widthPct;
  if (end < 85) return { left: `${end}%` };
  if (row.leftPct > 15) return { right: `${100 - row.leftPct}%`, paddingRight: "0.4em" };
  return { right: `${100 - end}%`, paddingRight: "0.4em", color: "#fff" };
}

function serviceBadge(service) {
  return el("span", { class: "service", style: { borderColor: colourOf(service) } }, service);
}

const LOOKBACK_US = { "15m": 15 * 60e6, "1h": 3600e6, "6h": 6 * 3600e6, "24h": 24 * 3600e6 };

async function searchPage(params) {
  const services = (await api("api/services")).filter((name) => name !== "jaeger").sort();
  const service = params.get("service") || (services.includes("gateway") ? "gateway" : services[0]);
  const lookback = LOOKBACK_US[params.get("lookback")] ? params.get("lookback") : "1h";
  const limit = params.get("limit") || "20";
  const form = el(
    "form",
    { class: "search", method: "get", action: "search" },
    el("label", {}, "service ", el("select", { name: "service" },
      ...services.map((name) => el("option", name === service ? { selected: "" } : {}, name)))),
    el("label", {}, " last ", el("select", { name: "lookback" },
      ...Object.keys(LOOKBACK_US).map((span) => el("option", span === lookback ? { selected: "" } : {}, span)))),
    el("label", {}, " limit ", el("input", { name: "limit", value: limit, size: "4" })),
    el("button", {}, "Find traces"),
  );
  page.replaceChildren(form);
  if (!service) {
    page.append(el("p", { class: "muted" }, "No service has sent spans yet."));
    return;
  }
  // The query API takes a time range in µs (it has no lookback for traces).
  const endUs = Date.now() * 1000;
  const query = new URLSearchParams({ service, limit, start: endUs - LOOKBACK_US[lookback], end: endUs });
  const traces = (await api(`api/traces?${query}`)).map(traceSummary).sort((a, b) => b.startUs - a.startUs);
  const table = el("table", { class: "traces" },
    el("tr", {}, ...["started", "root span", "services", "spans", "errors", "duration"].map((h) => el("th", {}, h))));
  for (const trace of traces) {
    table.append(el("tr", {},
      el("td", {}, new Date(trace.startUs / 1000).toLocaleString()),
      el("td", {}, el("a", { href: `trace/${trace.traceID}` }, trace.root)),
      el("td", {}, ...trace.services.map(serviceBadge)),
      el("td", { class: "number" }, String(trace.spanCount)),
      el("td", { class: trace.errors ? "number error" : "number" }, String(trace.errors)),
      el("td", { class: "number" }, formatDuration(trace.durationUs)),
    ));
  }
  page.append(traces.length ? table : el("p", { class: "muted" }, `No trace of ${service} in the last ${lookback}.`));
}

function spanDetails(row) {
  const items = Object.entries(row.tags).map(([key, value]) => el("tr", {}, el("td", {}, key), el("td", {}, String(value))));
  const links = row.links.map((link) =>
    el("tr", {}, el("td", {}, link.type), el("td", {}, el("a", { href: `trace/${link.traceID}` }, `${link.traceID} / ${link.spanID}`))));
  return el("table", { class: "tags" },
    el("tr", {}, el("td", {}, "span id"), el("td", {}, row.spanID)),
    el("tr", {}, el("td", {}, "starts at"), el("td", {}, `+${formatDuration(row.offsetUs)}`)),
    ...items, ...links);
}

async function tracePage(traceId) {
  const [trace] = await api(`api/traces/${encodeURIComponent(traceId)}`);
  const summary = traceSummary(trace);
  document.title = `${summary.root} · Open-AutoGLM traces`;
  page.replaceChildren(
    el("h2", {}, summary.root),
    el("p", { class: "muted" },
      `trace ${summary.traceID} · ${new Date(summary.startUs / 1000).toLocaleString()} · ` +
      `${formatDuration(summary.durationUs)} · ${summary.spanCount} spans · `, ...summary.services.map(serviceBadge)),
  );
  const waterfall = el("div", { class: "waterfall" });
  for (const row of spanRows(trace)) {
    const details = el("div", { class: "details", hidden: "" }, spanDetails(row));
    const line = el("div", { class: row.error ? "row error" : "row", onclick: () => details.toggleAttribute("hidden") },
      el("div", { class: "label", style: { paddingLeft: `${row.depth * 14}px` } }, serviceBadge(row.service), ` ${row.operation}`),
      el("div", { class: "timeline" },
        el("div", { class: "bar", style: { left: `${row.leftPct}%`, width: `${row.widthPct}%`, background: colourOf(row.service) } }),
        el("span", { class: "duration", style: durationStyle(row) }, formatDuration(row.durationUs))),
    );
    waterfall.append(line, details);
  }
  page.append(waterfall);
}

function route() {
  const path = location.pathname.replace(/^.*?\/(trace\/|search)/, "$1");
  const match = path.match(/^trace\/([0-9a-fA-F]+)/);
  return match ? tracePage(match[1]) : searchPage(new URLSearchParams(location.search));
}

document.getElementById("lookup").addEventListener("submit", (event) => {
  event.preventDefault();
  location.href = `trace/${new FormData(event.target).get("trace").trim()}`;
});
if (window.JAEGER_VERSION) {
  document.getElementById("served-by").textContent = `served by Jaeger ${window.JAEGER_VERSION.gitVersion || ""}`;
}
route().catch(showError);
