// Paddler fleet dashboard: polls the management API once a second and redraws in place.
// Everything the agents send (names, models, errors) is written with textContent, never parsed
// as HTML: an agent must not be able to inject markup into an operator's browser.
"use strict";

(() => {
  const POLL_MS = 1000;
  const CHART_SECONDS = 300; // the longest span a chart shows
  const CHART_MIN_SECONDS = 60; // the shortest, so a young balancer's few seconds are not stretched
  const RATE_SECONDS = 10;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const WIDTH = 600;
  const HEIGHT = 140;
  const BAD_STATES = new Set(["unreachable", "unauthorized", "slots_disabled", "error"]);

  const byId = (id) => document.getElementById(id);
  const rows = new Map(); // agent id -> { row, cells }

  async function getJSON(path) {
    // Relative: the page may sit behind a proxy that adds a path prefix.
    const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function setConnection(state, text) {
    const pill = byId("connection");
    pill.dataset.state = state;
    byId("connection-text").textContent = text;
  }

  function setText(id, value) {
    const element = byId(id);
    const text = String(value);
    if (element.textContent !== text) element.textContent = text;
  }

  function formatRate(value) {
    if (value >= 100) return value.toFixed(0);
    if (value >= 10) return value.toFixed(1);
    return value.toFixed(2);
  }

  function formatAge(seconds) {
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- totals ------------------------------------------------------------------------------

  function renderTotals(fleet, stats) {
    const agents = fleet.agents;
    const usable = agents.filter(
      (agent) => agent.verified !== false && agent.state === "ok" && !agent.circuit_open,
    );
    const total = fleet.slots_idle + fleet.slots_processing;
    setText("agents-usable", usable.length);
    setText("agents-total", agents.length);
    setText("slots-processing", fleet.slots_processing);
    setText("slots-total", total);
    setText("slots-idle", fleet.slots_idle);
    const fill = byId("slots-fill");
    fill.style.width = `${total ? (100 * fleet.slots_processing) / total : 0}%`;
    fill.classList.toggle("full", total > 0 && fleet.slots_idle === 0);
    setText("requests-buffered", fleet.requests_buffered);
    byId("requests-buffered").classList.toggle("busy", fleet.requests_buffered > 0);

    const series = stats.series;
    const recent = series.slice(-RATE_SECONDS);
    const requests = recent.reduce((sum, second) => sum + second.requests, 0);
    setText("request-rate", recent.length ? formatRate(requests / recent.length) : "0");
    const lastMinutes = series.slice(-CHART_SECONDS);
    const errors = lastMinutes.reduce((sum, second) => sum + second.errors, 0);
    const answered = lastMinutes.reduce((sum, second) => sum + second.requests, 0);
    setText("errors-recent", errors);
    byId("errors-recent").classList.toggle("alert", errors > 0);
    const share = answered ? ` (${((100 * errors) / answered).toFixed(1)}% of ${answered})` : "";
    setText("errors-hint", `in the last 5 min${share}`);
    setText(
      "agents-summary",
      agents.length ? `${agents.length} connected, ${usable.length} taking requests` : "",
    );
  }

  // -- agents table --------------------------------------------------------------------------

  function createRow(agent) {
    const row = document.createElement("tr");
    row.dataset.agentId = agent.id;
    const cells = {};

    const who = element("td");
    cells.name = element("span", "agent-name");
    cells.name.dataset.field = "name";
    who.append(cells.name);

    const address = element("td", "address");
    cells.url = address;
    address.dataset.field = "url";

    cells.models = element("td", "models");
    cells.models.dataset.field = "models";

    const slots = element("td");
    const wrap = element("div", "slots");
    const bar = element("div", "bar");
    cells.fill = element("span", "fill");
    bar.append(cells.fill);
    cells.slots = element("span", "count");
    cells.slots.dataset.field = "slots";
    wrap.append(bar, cells.slots);
    slots.append(wrap);

    cells.inFlight = element("td", "num");
    cells.inFlight.dataset.field = "in-flight";

    const status = element("td");
    cells.state = element("span", "badge");
    cells.state.dataset.field = "state";
    cells.error = element("span", "error-text");
    cells.error.dataset.field = "error";
    status.append(cells.state, cells.error);

    const circuit = element("td");
    cells.circuit = element("span", "badge");
    cells.circuit.dataset.field = "circuit";
    circuit.append(cells.circuit);

    cells.age = element("td", "num age");
    cells.age.dataset.field = "last-report";

    row.append(who, address, cells.models, slots, cells.inFlight, status, circuit, cells.age);
    return { row, cells };
  }

  function updateRow({ cells }, agent) {
    cells.name.textContent = agent.name;
    cells.name.title = agent.id;
    cells.url.textContent = agent.url;
    cells.models.textContent = agent.models.length ? agent.models.join(", ") : "–";

    const total = agent.slots_total;
    cells.fill.style.width = `${total ? (100 * agent.slots_processing) / total : 0}%`;
    cells.fill.classList.toggle("full", total > 0 && agent.slots_idle === 0);
    cells.slots.replaceChildren(
      element("b", "", String(agent.slots_processing)),
      document.createTextNode(` / ${total} · ${agent.slots_idle} idle`),
    );
    cells.inFlight.textContent = String(agent.requests_in_flight);

    // Until the balancer has reached the agent's address itself, its slots count for nothing.
    const unverified = agent.verified === false;
    const state = unverified ? "unverified" : agent.state;
    const detail = unverified ? agent.verification : agent.error;
    cells.state.textContent = state.replace("_", " ");
    cells.state.className = `badge ${state === "ok" ? "ok" : BAD_STATES.has(state) ? "bad" : "loading"}`;
    cells.error.textContent = detail || "";
    cells.error.hidden = !detail;

    cells.circuit.textContent = agent.circuit_open ? "open" : "closed";
    cells.circuit.className = `badge ${agent.circuit_open ? "open" : ""}`;

    const age = agent.last_report_age_seconds;
    cells.age.textContent = `${formatAge(age)} ago`;
    cells.age.classList.toggle("stale", age > 2);
  }

  function renderAgents(agents) {
    const body = byId("agents");
    const seen = new Set();
    const ordered = [...agents].sort(
      (a, b) => a.name.localeCompare(b.name) || a.url.localeCompare(b.url),
    );
    ordered.forEach((agent, index) => {
      seen.add(agent.id);
      let entry = rows.get(agent.id);
      if (!entry) {
        entry = createRow(agent);
        rows.set(agent.id, entry);
      }
      updateRow(entry, agent);
      if (body.children[index] !== entry.row) body.insertBefore(entry.row, body.children[index] || null);
    });
    for (const [id, entry] of rows) {
      if (!seen.has(id)) {
        entry.row.remove();
        rows.delete(id);
      }
    }
    byId("agents-empty").hidden = agents.length > 0;
  }

  // -- charts --------------------------------------------------------------------------------

  function niceMax(value) {
    if (value <= 1) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * magnitude) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function svgNode(tag, attributes) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }

  // One point per second, in the middle of its second, placed by its time.
  function pathFor(points, toX, toY, closed) {
    if (!points.length) return "";
    const coordinates = points.map(([t, value]) => `${toX(t + 0.5).toFixed(1)},${toY(value).toFixed(1)}`);
    const line = `M${coordinates.join("L")}`;
    if (!closed) return line;
    const first = toX(points[0][0] + 0.5).toFixed(1);
    const last = toX(points[points.length - 1][0] + 0.5).toFixed(1);
    return `${line}L${last},${HEIGHT}L${first},${HEIGHT}Z`;
  }

  function describeSpan(seconds) {
    return seconds % 60 ? `${seconds} s ago` : `${seconds / 60} min ago`;
  }

  function drawChart(id, series, layers, unit) {
    const card = byId(id);
    const svg = card.querySelector("svg");
    const end = series.length ? series[series.length - 1].t + 1 : Math.floor(Date.now() / 1000);
    const span = Math.min(CHART_SECONDS, Math.max(CHART_MIN_SECONDS, Math.ceil(series.length / 60) * 60));
    const start = end - span;
    const visible = series.filter((second) => second.t >= start);
    let peak = 0;
    for (const layer of layers) {
      for (const second of visible) peak = Math.max(peak, layer.value(second));
    }
    const top = niceMax(peak);
    const toX = (t) => ((t - start) / span) * WIDTH;
    const toY = (value) => HEIGHT - (value / top) * (HEIGHT - 4);

    const nodes = [];
    for (const fraction of [0.25, 0.5, 0.75, 1]) {
      const y = toY(top * fraction).toFixed(1);
      nodes.push(svgNode("line", { class: "grid", x1: 0, x2: WIDTH, y1: y, y2: y }));
    }
    nodes.push(svgNode("line", { class: "grid", x1: 0, x2: WIDTH, y1: HEIGHT, y2: HEIGHT }));
    for (const layer of layers) {
      const points = visible.map((second) => [second.t, layer.value(second)]);
      if (layer.area) {
        nodes.push(svgNode("path", { class: `${layer.name} area`, d: pathFor(points, toX, toY, true) }));
      }
      nodes.push(svgNode("path", { class: `${layer.name} line`, d: pathFor(points, toX, toY, false) }));
    }
    svg.replaceChildren(...nodes);
    card.querySelector(".ymax").textContent = `${top}${unit}`;
    card.querySelector(".since").textContent = describeSpan(span);
  }

  function renderCharts(stats) {
    const series = stats.series;
    drawChart(
      "chart-requests",
      series,
      [
        { name: "requests", value: (second) => second.requests, area: true },
        { name: "errors", value: (second) => second.errors, area: true },
      ],
      "/s",
    );
    drawChart(
      "chart-slots",
      series,
      [
        { name: "processing", value: (second) => second.slots_processing, area: true },
        { name: "total", value: (second) => second.slots_total, area: false },
      ],
      "",
    );
    drawChart(
      "chart-buffered",
      series,
      [{ name: "buffered", value: (second) => second.requests_buffered, area: true }],
      "",
    );
  }

  // -- polling -------------------------------------------------------------------------------

  let lastSuccess = 0;

  async function refresh() {
    try {
      const [fleet, stats] = await Promise.all([getJSON("api/v1/agents"), getJSON("api/v1/stats")]);
      renderTotals(fleet, stats);
      renderAgents(fleet.agents);
      renderCharts(stats);
      lastSuccess = Date.now();
      setConnection("live", "live");
      document.body.dataset.updated = String(lastSuccess);
    } catch (error) {
      const since = lastSuccess ? `, last update ${formatAge((Date.now() - lastSuccess) / 1000)} ago` : "";
      setConnection("lost", `balancer unreachable${since}`);
    } finally {
      // Scheduled after the answer, so a slow balancer is never asked twice at once.
      setTimeout(refresh, POLL_MS);
    }
  }

  refresh();
})();
