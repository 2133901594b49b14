// crystal watch: polls the run's state (live.json, through /api/state) and its new metrics lines
// (/api/metrics?after=N) once a second, and redraws the ring, the table and the charts.
// Test hooks: every sphere carries data-sphere and data-batches, ROOT data-root and data-step,
// every chart data-points (its number of points).
"use strict";

const POLL_MS = 1000;
// activity buckets by recent utilization, as in the terminal view: [threshold, name, colour]
const ACTIVITY = [[0.75, "very active", "#e6b800"], [0.40, "active", "#2e9d3a"],
                  [0.05, "some", "#1a9fb0"], [0.0, "idle", "#9a9a9a"]];
const SVG = "http://www.w3.org/2000/svg";

const WAITING = [0, "waiting for a core", "#b05fd0"];  // the core gate held it back more than it computed

function activity(u, waiting) {
  if (waiting >= 0.05 && waiting > u) return WAITING;
  for (const a of ACTIVITY) if (u >= a[0]) return a;
  return ACTIVITY[ACTIVITY.length - 1];
}

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(x, digits) {
  return (x === null || x === undefined || !isFinite(x)) ? "-" : Number(x).toFixed(digits);
}

// The ring: n spheres on a circle around ROOT, each coloured by its recent activity.
function drawRing(live) {
  const svg = document.getElementById("ring");
  svg.replaceChildren();
  const spheres = live.spheres || [];
  const n = Math.max(1, spheres.length), R = 160, r = Math.max(14, Math.min(30, 300 / n));
  svg.appendChild(el("circle", {cx: 0, cy: 0, r: R, fill: "none", stroke: "#ddd", "stroke-dasharray": "4 4"}));
  spheres.forEach((s, i) => {
    const a = 2 * Math.PI * i / n - Math.PI / 2, x = R * Math.cos(a), y = R * Math.sin(a);
    const g = el("g", {"data-sphere": s.sphere, "data-batches": s.batches, class: "sphere"});
    const [, name, colour] = activity(s.recent ?? s.utilization ?? 0, s.recent_wait ?? 0);
    g.appendChild(el("line", {x1: 0, y1: 0, x2: x, y2: y, stroke: colour, "stroke-opacity": 0.35}));
    g.appendChild(el("circle", {cx: x, cy: y, r: r, fill: colour, stroke: "#333"}));
    g.appendChild(el("text", {x: x, y: y - 2, "text-anchor": "middle", "font-size": 11, "font-weight": "bold"}, String(s.sphere)));
    g.appendChild(el("text", {x: x, y: y + 11, "text-anchor": "middle", "font-size": 10}, String(s.batches)));
    g.appendChild(el("title", {}, `sphere ${s.sphere}: ${s.batches} batches, ${name}`));
    svg.appendChild(g);
  });
  const root = el("g", {"data-root": "", "data-step": live.step ?? 0});
  root.appendChild(el("circle", {cx: 0, cy: 0, r: 62, fill: "#7a2d8c", stroke: "#333"}));
  root.appendChild(el("text", {x: 0, y: -22, "text-anchor": "middle", fill: "#fff", "font-weight": "bold"}, "ROOT"));
  root.appendChild(el("text", {x: 0, y: -4, "text-anchor": "middle", fill: "#fff", "font-size": 12},
                      `step ${live.step ?? 0}/${live.steps ?? "?"}`));
  root.appendChild(el("text", {x: 0, y: 13, "text-anchor": "middle", fill: "#fff", "font-size": 12},
                      `${live.active ?? 0} active`));
  root.appendChild(el("text", {x: 0, y: 30, "text-anchor": "middle", fill: "#fff", "font-size": 12},
                      `norm ${fmt(live.grad_norm, 3)}`));
  svg.appendChild(root);
}

function drawTable(live) {
  const body = document.querySelector("#spheres tbody");
  body.replaceChildren();
  for (const s of live.spheres || []) {
    const tr = document.createElement("tr");
    for (const v of [s.sphere, s.batches, fmt(s.avg_loss, 4), fmt(100 * s.utilization, 1),
                     Math.round(s.tokens_per_s || 0).toLocaleString()]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  const ranks = live.ranks || 1;
  document.getElementById("ranks").textContent = ranks > 1 ? `${ranks} ranks; the ring is rank 0's` : "";
}

const data = {loss: [], val: [], lr: [], rate: []};  // [step, elapsed, value]
const charts = {};
let after = 0;
let shown = null;  // the live state's time last drawn: nothing is redrawn until it changes

function series(name) {
  // loss and val loss against step and time share one table of rows [x, loss, val]
  if (name === "loss-step" || name === "loss-time") {
    const i = name === "loss-step" ? 0 : 1, rows = new Map();
    for (const p of data.loss) rows.set(p[i], [p[i], p[2], null]);
    for (const p of data.val) {
      const row = rows.get(p[i]) || [p[i], null, null];
      row[2] = p[2];
      rows.set(p[i], row);
    }
    return [...rows.values()].sort((a, b) => a[0] - b[0]);
  }
  return (name === "lr" ? data.lr : data.rate).map(p => [p[0], p[2]]);
}

const LABELS = {"loss-step": ["step", "loss", "val loss"], "loss-time": ["seconds", "loss", "val loss"],
                "lr": ["step", "lr"], "rate": ["step", "tokens/s"]};

function drawCharts() {
  for (const name of Object.keys(LABELS)) {
    const rows = series(name), div = document.getElementById(name);
    div.setAttribute("data-points", rows.length);
    if (!rows.length) continue;
    if (!charts[name]) {
      charts[name] = new Dygraph(div, rows, {labels: LABELS[name], connectSeparatedPoints: true,
                                             drawPoints: name.startsWith("loss"), pointSize: 1.5,
                                             legend: "follow", animatedZooms: false,
                                             axes: {y: {axisLabelWidth: 64}},
                                             series: {"val loss": {strokeWidth: 2.5, drawPoints: true, pointSize: 3,
                                                                   color: "#c0392b"}}});
    } else {
      charts[name].updateOptions({file: rows});
    }
  }
}

async function poll() {
  try {
    const state = await (await fetch("api/state", {cache: "no-store"})).json();
    document.getElementById("title").textContent = `crystal watch: ${state.run}`;
    document.getElementById("problem").textContent = state.problem || "";
    const live = state.live;
    if (live && live.time !== shown) {
      shown = live.time;
      document.getElementById("status").textContent =
        `${live.status} | ${live.preset} on ${live.device} | step ${live.step}/${live.steps} | loss ${fmt(live.loss, 4)}` +
        ` | val ${fmt(live.val_loss, 4)}` +
        (live.task ? ` | ${live.task} acc ${fmt(live.task_acc, 4)} acc_norm ${fmt(live.task_acc_norm, 4)}` : "") +
        ` | ${Math.round(live.tokens_per_s || 0).toLocaleString()} tok/s`;
      drawRing(live);
      drawTable(live);
    } else if (!live) {
      document.getElementById("status").textContent = "waiting for the run to write its live state";
    }
    const m = await (await fetch(`api/metrics?after=${after}`, {cache: "no-store"})).json();
    if (m.reset) for (const k of Object.keys(data)) data[k] = [];  // the file was rewritten (a resume)
    for (const r of m.records) {
      if (r.loss !== undefined) {
        data.loss.push([r.step, r.elapsed, r.loss]);
        data.lr.push([r.step, r.elapsed, r.lr]);
        data.rate.push([r.step, r.elapsed, r.tokens_per_s]);
      } else if (r.val_loss !== undefined) {
        const last = data.loss.filter(p => p[0] === r.step).pop();
        data.val.push([r.step, last ? last[1] : r.step, r.val_loss]);
      }
    }
    after = m.next;
    if (m.records.length || m.reset) drawCharts();
  } catch (e) {
    document.getElementById("problem").textContent = `cannot reach the server: ${e}`;
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("legend").innerHTML = [...ACTIVITY, WAITING].map(
  a => `<span><span class="swatch" style="background:${a[2]}"></span>${a[1]}</span>`).join("");
poll();
