// Quiver's web UI: reads the coordinator's JSON API and draws the cluster (#/) or one query
// (#/queries/<id>): its Stage DAG, a timeline of its Task Attempts on the workers' slots, and a
// table of every Task. Pages refresh every REFRESH_MS while something may still change.
// Elements tests look for carry stable ids and data-* attributes.
"use strict";

const REFRESH_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];

// DAG geometry, in pixels.
const NODE_W = 190, NODE_H = 80, COL_GAP = 70, ROW_GAP = 22, DAG_PAD = 12;
// Timeline geometry, in pixels.
const LANE_H = 18, LANE_GAP = 4, LABEL_W = 110, PLOT_W = 900, AXIS_H = 22, MIN_BAR_W = 2;

let generation = 0; // bumped on every navigation: answers for an older page are dropped

// ---------- DOM helpers ----------

function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(id, headers, rows, emptyText) {
  if (rows.length === 0) return el("div", { id, class: "empty" }, emptyText);
  const head = el("tr", {}, headers.map(([label, cls]) => el("th", { class: cls }, label)));
  return el("table", { id }, el("thead", {}, head), el("tbody", {}, rows));
}

function badge(state) {
  return el("span", { class: `badge state-${state}` }, state);
}

function meter(used, total) {
  const pct = total > 0 ? Math.min(100, (100 * used) / total) : 0;
  return el("span", { class: "meter" }, el("span", { style: `width:${pct.toFixed(1)}%` }));
}

function card(metric, value, label) {
  return el("div", { class: "card", "data-metric": metric },
    el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

// ---------- formatting ----------

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

function fmtMs(ms) {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(2)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function fmtTime(ms) {
  return new Date(ms).toLocaleTimeString();
}

function fmtNum(n) {
  return n.toLocaleString("en-US");
}

// ---------- data ----------

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

// ---------- cluster overview ----------

async function overviewPage() {
  const [workers, queries] = await Promise.all([getJson("/api/workers"), getJson("/api/queries")]);
  const view = el("div", { id: "overview" },
    el("h1", {}, "Cluster"),
    clusterCards(workers.workers, queries.queries),
    el("h2", {}, "Workers"),
    el("div", { class: "panel" }, workersTable(workers.workers)),
    el("h2", {}, "Running queries"),
    el("div", { class: "panel" }, queriesTable("running-queries", queries.queries.filter((q) => q.state === "running"), "No query is running.")),
    el("h2", {}, "Recent queries"),
    el("div", { class: "panel" }, queriesTable("recent-queries", queries.queries.filter((q) => q.state !== "running"), "No query has finished yet.")));
  return { view, again: true };
}

function clusterCards(workers, queries) {
  const alive = workers.filter((w) => w.alive);
  const sum = (f) => alive.reduce((total, w) => total + f(w), 0);
  const running = queries.filter((q) => q.state === "running").length;
  return el("div", { class: "cards", id: "cluster-summary" },
    card("workers-alive", `${alive.length} / ${workers.length}`, "workers alive"),
    card("slots", `${sum((w) => w.running_tasks)} / ${sum((w) => w.slots)}`, "slots in use"),
    card("memory", `${fmtBytes(sum((w) => w.memory_used_bytes))} / ${fmtBytes(sum((w) => w.memory_limit_bytes))}`, "worker memory"),
    card("queries-running", running, "queries running"));
}

function workersTable(workers) {
  const rows = workers.map((w) => el("tr", { "data-worker-id": w.id, "data-alive": w.alive },
    el("td", {}, w.id),
    el("td", {}, w.url),
    el("td", {}, badge(w.alive ? "alive" : "lost")),
    el("td", {}, meter(w.running_tasks, w.slots), `${w.running_tasks} / ${w.slots}`),
    el("td", {}, meter(w.memory_used_bytes, w.memory_limit_bytes), `${fmtBytes(w.memory_used_bytes)} / ${fmtBytes(w.memory_limit_bytes)}`),
    el("td", { title: `held off the CPU ${w.stalled_pct.toFixed(0)}% of its busy time lately` }, `${w.pace.toFixed(2)}×`),
    el("td", { title: fmtTime(w.last_heartbeat_ms) }, `${fmtMs(w.heartbeat_age_ms)} ago`)));
  const headers = [["Worker"], ["Address"], ["State"], ["Slots in use"], ["Memory"], ["Pace"], ["Last heartbeat"]];
  return table("workers", headers, rows, "No worker has registered.");
}

function queriesTable(id, queries, emptyText) {
  const rows = queries.map((q) => el("tr", { "data-query-id": q.id, "data-query-state": q.state },
    el("td", {}, el("a", { href: `#/queries/${encodeURIComponent(q.id)}` }, q.id)),
    el("td", {}, badge(q.state)),
    el("td", {}, q.mode),
    el("td", { class: "sql", title: q.sql }, q.sql),
    el("td", { class: "num" }, q.mode === "distributed" ? `${q.tasks_done} / ${q.tasks}` : "–"),
    el("td", { class: "num" }, fmtNum(q.rows)),
    el("td", { class: "num" }, fmtBytes(q.bytes_shuffled)),
    el("td", { class: "num" }, fmtBytes(q.bytes_gathered)),
    el("td", {}, fmtTime(q.started_ms)),
    el("td", { class: "num" }, fmtMs(q.duration_ms))));
  const headers = [["Query"], ["State"], ["Mode"], ["SQL"], ["Tasks done", "num"], ["Rows", "num"],
    ["Shuffled", "num"], ["Gathered", "num"], ["Started"], ["Duration", "num"]];
  return table(id, headers, rows, emptyText);
}

// ---------- one query ----------

async function queryPage(id) {
  const [detail, workers] = await Promise.all([getJson(`/api/queries/${encodeURIComponent(id)}`), getJson("/api/workers")]);
  const query = detail.query;
  const view = el("div", { id: "query", "data-query-id": query.id, "data-query-state": query.state },
    el("p", {}, el("a", { href: "#/" }, "← cluster")),
    el("h1", {}, "Query ", el("span", { id: "query-id" }, query.id), " ", badge(query.state)),
    el("pre", { class: "sql" }, query.sql),
    querySummary(query),
    query.error ? el("p", { id: "query-error", class: "error-text" }, query.error) : null,
    el("h2", {}, "Stages"),
    el("div", { class: "panel" }, detail.stages.length ? dag(detail) : el("div", { id: "dag", class: "empty" }, "Ran on the coordinator alone: no Stages.")),
    el("h2", {}, "Task timeline"),
    el("div", { class: "panel" }, timeline(detail, workers.workers), legend(detail.tasks)),
    el("h2", {}, "Tasks"),
    el("div", { class: "panel" }, tasksTable(detail.tasks, query.started_ms)));
  return { view, again: query.state === "running" };
}

function querySummary(q) {
  return el("div", { class: "cards", id: "query-summary" },
    card("mode", q.mode, "mode"),
    card("tasks", `${q.tasks_done} / ${q.tasks}`, "tasks done"),
    card("rows", fmtNum(q.rows), "rows returned"),
    card("duration", fmtMs(q.duration_ms), q.state === "running" ? "running for" : "duration"),
    card("shuffled", fmtBytes(q.bytes_shuffled), "shuffled"),
    card("gathered", fmtBytes(q.bytes_gathered), "gathered"),
    card("started", fmtTime(q.started_ms), "started"));
}

/// A Stage's state from its Tasks' Attempts: running wins, then done (every Task has a
/// succeeded Attempt); a failed Attempt that was retried does not fail its Stage.
function stageState(stage, tasks) {
  const has = (state) => tasks.some((t) => t.state === state);
  if (has("running")) return "running";
  if (stage.tasks > 0 && stage.tasks_done === stage.tasks) return "succeeded";
  if (has("failed") && !has("queued")) return "failed";
  if (has("cancelled") && !has("queued")) return "cancelled";
  return has("succeeded") ? "running" : "queued";
}

/// Columns by depth: a Stage sits one column right of its deepest input. The coordinator's
/// final Stage reads every Stage no other Stage reads.
function dagLayout(stages) {
  const depth = new Map();
  for (const s of stages) { // inputs come first
    depth.set(s.id, s.inputs.length ? 1 + Math.max(...s.inputs.map((i) => depth.get(i) ?? 0)) : 0);
  }
  const read = new Set(stages.flatMap((s) => s.inputs));
  const final = { id: "final", inputs: stages.filter((s) => !read.has(s.id)).map((s) => s.id) };
  depth.set("final", 1 + Math.max(...final.inputs.map((i) => depth.get(i))));
  const columns = [];
  for (const node of [...stages, final]) (columns[depth.get(node.id)] ||= []).push(node);
  const position = new Map();
  const tallest = Math.max(...columns.map((c) => c.length));
  const height = tallest * NODE_H + (tallest - 1) * ROW_GAP;
  columns.forEach((column, d) => {
    const top = (height - (column.length * NODE_H + (column.length - 1) * ROW_GAP)) / 2;
    column.forEach((node, row) => position.set(node.id, {
      x: DAG_PAD + d * (NODE_W + COL_GAP), y: DAG_PAD + top + row * (NODE_H + ROW_GAP),
    }));
  });
  const width = 2 * DAG_PAD + columns.length * NODE_W + (columns.length - 1) * COL_GAP;
  return { final, position, width, height: height + 2 * DAG_PAD };
}

function dag(detail) {
  const { stages, tasks, query } = detail;
  const { final, position, width, height } = dagLayout(stages);
  const byId = new Map(stages.map((s) => [s.id, s]));
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    svg("path", { d: "M0,0 L10,5 L0,10 z" }));
  const edges = [...stages, final].flatMap((to) => to.inputs.map((from) => edge(from, to.id, byId.get(from).output, position)));
  const nodes = stages.map((s) => stageNode(s, tasks.filter((t) => t.stage === s.id), position.get(s.id)));
  nodes.push(finalNode(query, position.get("final")));
  return svg("svg", { id: "dag", width, height, viewBox: `0 0 ${width} ${height}` }, svg("defs", {}, marker), edges, nodes);
}

function edge(from, to, output, position) {
  const a = position.get(from), b = position.get(to);
  const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2, mid = (x1 + x2) / 2;
  return svg("path", {
    class: `edge ${output}`, "data-from": from, "data-to": to, "marker-end": "url(#arrow)",
    d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
  }, svg("title", {}, `stage ${from} → ${to === "final" ? "coordinator" : `stage ${to}`} (${output})`));
}

function stageNode(stage, tasks, p) {
  const state = stageState(stage, tasks);
  return svg("g", { class: "stage", "data-stage-id": stage.id, "data-stage-state": state, "data-output": stage.output, transform: `translate(${p.x},${p.y})` },
    svg("title", {}, `Stage ${stage.id}: ${state}, reads ${stage.inputs.length ? stage.inputs.join(", ") : "files"}`),
    svg("rect", { class: "box", width: NODE_W, height: NODE_H, rx: 6 }),
    svg("rect", { class: `status state-${state}`, width: 6, height: NODE_H, rx: 3 }),
    svg("text", { x: 14, y: 18, "font-weight": 600 }, `Stage ${stage.id}`),
    svg("text", { x: NODE_W - 8, y: 18, "text-anchor": "end", class: "muted" }, `→ ${stage.output}`),
    svg("text", { x: 14, y: 36 }, `${stage.tasks_done} / ${stage.tasks} tasks · ${fmtMs(stage.elapsed_ms)}`),
    svg("text", { x: 14, y: 54, class: "muted" }, `${fmtNum(stage.rows)} rows · ${fmtBytes(stage.bytes)}`),
    ...partitionBars(stage));
}

// A shuffle's output per partition, as bars along the node's foot: a skewed partition stands out.
function partitionBars(stage) {
  const bytes = stage.partition_bytes || [];
  if (!bytes.length) return [];
  const max = Math.max(...bytes, 1), width = (NODE_W - 22) / bytes.length, tall = 14;
  return bytes.map((b, i) => {
    const height = Math.max((tall * b) / max, 0.5);
    return svg("rect", {
      class: "partition", "data-partition": i, "data-partition-bytes": b,
      x: 14 + i * width, y: NODE_H - 4 - height, width: Math.max(width - 1, 1), height,
    }, svg("title", {}, `partition ${i}: ${fmtNum(stage.partition_rows[i])} rows · ${fmtBytes(b)}`));
  });
}

function finalNode(query, p) {
  return svg("g", { class: "stage final", "data-stage-id": "final", "data-stage-state": query.state, transform: `translate(${p.x},${p.y})` },
    svg("title", {}, "The final Stage, on the coordinator: it reads the last Stages' outputs and streams the result"),
    svg("rect", { class: "box", width: NODE_W, height: NODE_H, rx: 6 }),
    svg("rect", { class: `status state-${query.state}`, width: 6, height: NODE_H, rx: 3 }),
    svg("text", { x: 14, y: 18, "font-weight": 600 }, "Final stage"),
    svg("text", { x: 14, y: 36 }, "coordinator"),
    svg("text", { x: 14, y: 54, class: "muted" }, `${fmtNum(query.rows)} rows returned`));
}

/// Packs one worker's Attempts into at most `slots` lanes, first fit by start time. The
/// coordinator does not know which slot ran an Attempt; an Attempt that fits no lane (its report
/// overlapped the next assignment) goes to the lane that frees first.
function packLanes(tasks, slots) {
  const lanes = Array.from({ length: Math.max(1, slots) }, () => -Infinity);
  return [...tasks].sort((a, b) => a.start - b.start).map((t) => {
    let lane = lanes.findIndex((end) => end <= t.start);
    if (lane < 0) lane = lanes.indexOf(Math.min(...lanes));
    lanes[lane] = t.end;
    return { ...t, lane };
  });
}

function timeline(detail, workers) {
  const { query, now_ms: now } = detail;
  const started = detail.tasks.filter((t) => t.started_ms !== null && t.worker_id !== null);
  if (started.length === 0) return el("div", { id: "timeline", class: "empty" }, "No Task has started.");
  const t0 = query.started_ms;
  const t1 = query.state === "running" ? now : Math.max(t0 + query.duration_ms, ...started.map((t) => t.ended_ms ?? 0));
  const span = Math.max(1, t1 - t0);
  const x = (ms) => LABEL_W + ((ms - t0) / span) * PLOT_W;
  const slots = new Map(workers.map((w) => [w.id, w.slots]));
  const ids = [...new Set(started.map((t) => t.worker_id))].sort();
  const groups = [];
  let lane = 0;
  for (const id of ids) {
    const intervals = started.filter((t) => t.worker_id === id).map((t) => ({ task: t, start: t.started_ms, end: t.ended_ms ?? now }));
    const packed = packLanes(intervals, slots.get(id) ?? 1);
    const count = Math.max(slots.get(id) ?? 1, ...packed.map((p) => p.lane + 1));
    groups.push(workerLanes(id, count, packed, lane, x));
    lane += count;
  }
  const height = AXIS_H + lane * (LANE_H + LANE_GAP);
  const width = LABEL_W + PLOT_W + 50; // room for the last tick label
  return svg("svg", { id: "timeline", width, height, viewBox: `0 0 ${width} ${height}`, "data-span-ms": span },
    axis(span, x, t0, height), groups);
}

function workerLanes(id, count, packed, first, x) {
  const y = (lane) => AXIS_H + (first + lane) * (LANE_H + LANE_GAP);
  const backgrounds = Array.from({ length: count }, (_, i) => [
    svg("rect", { class: "lane-bg", x: LABEL_W, y: y(i), width: PLOT_W, height: LANE_H }),
    svg("text", { x: 4, y: y(i) + LANE_H - 5 }, `${id} · slot ${i + 1}`),
  ]);
  const bars = packed.map((p) => {
    const t = p.task;
    const width = Math.max(MIN_BAR_W, x(p.end) - x(p.start));
    return svg("rect", {
      class: `bar state-${t.state} started-${t.started_as}${t.cause ? " ended-" + t.cause : ""}`,
      x: x(p.start).toFixed(1), y: y(p.lane) + 2, width: width.toFixed(1), height: LANE_H - 4, rx: 2,
      "data-task-state": t.state, "data-stage-id": t.stage, "data-task": t.task, "data-attempt": t.attempt,
      "data-started-as": t.started_as, "data-cause": t.cause ?? "", "data-worker-id": id, "data-lane": p.lane,
    }, svg("title", {}, `stage ${t.stage} task ${t.task} (attempt ${t.attempt}, ${t.started_as}) on ${id}: ${t.state}` +
      `${t.cause ? " (" + t.cause.replaceAll("_", " ") + ")" : ""}, ${fmtMs(p.end - p.start)}, ${fmtNum(t.rows)} rows`));
  });
  return svg("g", { class: "worker-lanes", "data-worker-id": id, "data-lanes": count }, backgrounds, bars);
}

function axis(span, x, t0, height) {
  const step = niceStep(span / 8);
  const ticks = [];
  for (let ms = 0; ms <= span; ms += step) {
    ticks.push(svg("line", { class: "axis", x1: x(t0 + ms), x2: x(t0 + ms), y1: AXIS_H - 6, y2: height }));
    ticks.push(svg("text", { x: x(t0 + ms) + 2, y: AXIS_H - 9, class: "muted" }, fmtMs(ms)));
  }
  return svg("g", { class: "axis" }, ticks);
}

/// A tick step of 1, 2 or 5 times a power of ten milliseconds.
function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(Math.max(1, raw)));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

function legend(tasks) {
  const counts = STATES.map((s) => [s, tasks.filter((t) => t.state === s).length]);
  return el("div", { class: "legend", id: "task-states" }, counts.map(([state, n]) =>
    el("span", { "data-state": state, "data-count": n }, el("span", { class: `swatch state-${state}` }), `${state} ${n}`)));
}

/// Start and end times are shown from the query's start.
function tasksTable(tasks, queryStart) {
  const rows = tasks.map((t) => el("tr", { "data-stage-id": t.stage, "data-task": t.task, "data-task-state": t.state },
    el("td", { class: "num" }, t.stage),
    el("td", { class: "num" }, t.task),
    el("td", { class: "num" }, t.attempt),
    el("td", {}, t.started_as),
    el("td", { "data-lane": t.lane ?? "" }, (t.worker_id ?? "–") + (t.lane === "express" ? " · express" : "")),
    el("td", {}, badge(t.state)),
    el("td", {}, t.cause ? t.cause.replaceAll("_", " ") : ""),
    el("td", { class: "num" }, fmtNum(t.rows)),
    el("td", { class: "num" }, fmtBytes(t.bytes)),
    el("td", { class: "num" }, fmtMs(t.elapsed_ms)),
    el("td", { class: "num" }, t.started_ms ? `+${fmtMs(t.started_ms - queryStart)}` : "–"),
    el("td", { class: "num" }, t.ended_ms ? `+${fmtMs(t.ended_ms - queryStart)}` : "–"),
    el("td", { class: "plan" }, t.plan),
    el("td", {}, t.reads ?? ""),
    el("td", { class: "num", "data-work": t.work }, t.work === 1 ? "" : `${t.work.toFixed(2)}×`),
    el("td", { class: "num", "data-key-filter": t.key_filter_rows_seen ?? "" },
      t.key_filter_rows_seen == null ? "" : `${fmtNum(t.key_filter_rows_kept)} / ${fmtNum(t.key_filter_rows_seen)}`),
    el("td", { class: "error-text" }, t.error ?? "")));
  const headers = [["Stage", "num"], ["Task", "num"], ["Attempt", "num"], ["Started as"], ["Worker"], ["State"], ["Cause"], ["Rows", "num"],
    ["Bytes", "num"], ["Elapsed", "num"], ["Started", "num"], ["Ended", "num"], ["Plan"], ["Reads"], ["Work", "num"], ["Key filter kept / seen", "num"], ["Error"]];
  return table("tasks", headers, rows, "This query has no Tasks.");
}

// ---------- routing ----------

function currentPage() {
  const match = location.hash.match(/^#\/queries\/([^/?]+)$/);
  return match ? () => queryPage(decodeURIComponent(match[1])) : overviewPage;
}

/// Draws the current page, then again every REFRESH_MS while it may change, until navigation.
async function show(mine) {
  let again = true;
  try {
    const page = await currentPage()();
    if (mine !== generation) return;
    document.getElementById("app").replaceChildren(page.view);
    again = page.again;
    setStatus("live", again ? `updated ${new Date().toLocaleTimeString()}` : "final");
  } catch (error) {
    if (mine !== generation) return;
    document.getElementById("app").replaceChildren(el("p", { id: "error", class: "error-text" }, error.message));
    setStatus("error", "cannot reach the coordinator's API");
  }
  if (again) setTimeout(() => mine === generation && show(mine), REFRESH_MS);
}

function navigate() {
  generation += 1;
  show(generation);
}

window.addEventListener("hashchange", navigate);
navigate();
