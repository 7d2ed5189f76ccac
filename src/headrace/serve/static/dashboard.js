// The live dashboard: one EventSource per (range, filters); tiles updated in place.
"use strict";
const D = { def: null, source: null, tiles: {}, last: null, params: new URLSearchParams(location.search) };
const name = decodeURIComponent(location.pathname.split("/").pop());

function viewParams() {
  const p = new URLSearchParams();
  p.set("range", D.params.get("range") || "1h");
  if (p.get("range") === "custom") { p.set("from", D.params.get("from") || ""); p.set("to", D.params.get("to") || ""); }
  for (const [k, v] of D.params) if (k.startsWith("f.") && v) p.set(k, v);
  return p;
}

function buildTiles() {
  const grid = document.getElementById("grid");
  grid.innerHTML = "";
  for (const t of D.def.tiles) {
    const el = document.createElement("article");
    el.className = `tile w${t.width} chart-${t.chart}`;
    el.dataset.tile = t.name;
    el.innerHTML = `<h3>${HR.esc(t.title)}</h3><div class="body" data-testid="tile-${HR.esc(t.name)}"></div>` +
      `<div class="error hidden"></div><footer><span class="lag" data-testid="lag-${HR.esc(t.name)}">waiting…</span><span class="note"></span></footer>`;
    grid.appendChild(el);
    D.tiles[t.name] = { def: t, el, body: el.querySelector(".body"), plot: null, seriesKey: "" };
  }
}

function renderStat(tile, data) {
  const v = data.rows.length ? data.rows[0].find(x => typeof x === "number") ?? data.rows[0][0] : null;
  let node = tile.body.querySelector(".stat");
  if (!node) { node = document.createElement("div"); node.className = "stat"; tile.body.appendChild(node); }
  node.textContent = HR.fmt(v) + (tile.def.unit ? " " + tile.def.unit : "");
  node.dataset.value = v === null ? "" : String(v);
}

// Buckets without rows are gaps (null), not lines drawn across them.
function fillBuckets(rows, step) {
  if (rows.length < 2) return rows.map(r => [Date.parse(r[0]) / 1000, ...r.slice(1)]);
  const byTime = new Map(rows.map(r => [Date.parse(r[0]) / 1000, r.slice(1)]));
  const times = [...byTime.keys()];
  const first = Math.min(...times), last = Math.max(...times);
  if ((last - first) / step > 20000) return rows.map(r => [Date.parse(r[0]) / 1000, ...r.slice(1)]);
  const width = rows[0].length - 1, out = [];
  for (let t = first; t <= last; t += step) out.push([t, ...(byTime.get(t) || new Array(width).fill(null))]);
  return out;
}

function renderTimeseries(tile, data) {
  const names = data.columns.map(c => c.name);
  const filled = fillBuckets(data.rows, tile.def.drill ? tile.def.drill.grain_s : 300);
  const xs = filled.map(r => r[0]);
  const series = names.slice(1).map((_, i) => filled.map(r => r[i + 1]));
  const key = names.join("|");
  tile.body.dataset.points = String(xs.length);
  tile.body.dataset.sum = String(series.length ? series[0].reduce((a, b) => a + (b || 0), 0) : 0);
  const yValues = (u, vals) => vals.map(v => HR.fmt(v));
  if (tile.plot && tile.seriesKey === key) { tile.plot.setData([xs, ...series]); return; }
  if (tile.plot) tile.plot.destroy();
  const colors = ["#4aa3ff", "#f7b955", "#3fb950", "#ff6b6b", "#c792ea"];
  const width = Math.max(200, tile.body.clientWidth - 4);
  tile.plot = new uPlot({
    width, height: 200, series: [{}, ...names.slice(1).map((n, i) => ({ label: n, stroke: colors[i % colors.length], width: 2, points: { show: true, size: 4 } }))],
    axes: [{ stroke: "#8b98a5", grid: { stroke: "#2a3440" } }, { stroke: "#8b98a5", grid: { stroke: "#2a3440" }, size: 70, values: yValues }],
    cursor: { drag: { x: false, y: false } },
  }, [xs, ...series], tile.body);
  tile.seriesKey = key;
  if (tile.def.drill) {
    tile.plot.over.style.cursor = "pointer";
    tile.plot.over.addEventListener("click", () => {
      const idx = tile.plot.cursor.idx;
      if (idx === null || idx === undefined) return;
      openDrill(tile, tile.plot.data[0][idx]);
    });
  }
}

function renderBar(tile, data) {
  const max = Math.max(1, ...data.rows.map(r => Number(r[1]) || 0));
  tile.body.innerHTML = '<div class="bars">' + data.rows.map(r =>
    `<div class="bar"><span class="name">${HR.esc(r[0])}</span><span class="fill" style="width:${Math.round((Number(r[1]) || 0) / max * 60)}%"></span><span>${HR.esc(HR.fmt(r[1]))}</span></div>`).join("") + "</div>";
}

function renderTable(tile, data, highlight) {
  const before = new Set((tile.lastRows || []).map(r => JSON.stringify(r)));
  tile.body.innerHTML = HR.table(data.columns, data.rows, { accountLinks: true });
  tile.body.dataset.rows = String(data.rows.length);
  if (highlight && tile.lastRows) {
    tile.body.querySelectorAll("tbody tr").forEach((tr, i) => { if (!before.has(JSON.stringify(data.rows[i]))) tr.classList.add("fresh"); });
  }
  tile.lastRows = data.rows;
}

function applyUpdate(msg) {
  D.last = msg;
  for (const data of msg.tiles) {
    const tile = D.tiles[data.name];
    if (!tile) continue;
    const err = tile.el.querySelector(".error");
    err.classList.toggle("hidden", !data.error);
    err.textContent = data.error || "";
    tile.el.querySelector(".note").textContent = data.ignored_filters.length ? "filter not applied: " + data.ignored_filters.join(", ") : "";
    if (!data.error) {
      if (data.chart === "stat") renderStat(tile, data);
      else if (data.chart === "timeseries") renderTimeseries(tile, data);
      else if (data.chart === "bar") renderBar(tile, data);
      else renderTable(tile, data, data.chart === "alerts");
    }
    tile.body.dataset.version = String(msg.version);
  }
  tickLag();
}

function tickLag() {
  if (!D.last) return;
  const lag = HR.lagText(D.last.as_of);
  for (const tile of Object.values(D.tiles)) {
    const el = tile.el.querySelector(".lag");
    el.textContent = lag.text;
    el.classList.toggle("stale", lag.stale);
  }
}

function connect() {
  if (D.source) D.source.close();
  const status = document.getElementById("status");
  const url = `/api/live/${encodeURIComponent(name)}?` + viewParams().toString();
  D.source = new EventSource(url);
  D.source.addEventListener("tiles", ev => { status.textContent = "live"; status.className = "status live"; applyUpdate(JSON.parse(ev.data)); });
  D.source.onopen = () => { status.textContent = "live"; status.className = "status live"; };
  D.source.onerror = () => { status.textContent = "reconnecting…"; status.className = "status down"; };
}

function setParam(key, value) {
  if (value) D.params.set(key, value); else D.params.delete(key);
  history.replaceState(null, "", location.pathname + "?" + D.params.toString());
}

async function buildControls() {
  const range = document.getElementById("range");
  range.value = D.params.get("range") || "1h";
  const customs = document.querySelectorAll(".custom");
  const showCustom = () => customs.forEach(c => c.classList.toggle("hidden", range.value !== "custom"));
  showCustom();
  range.onchange = () => { showCustom(); if (range.value !== "custom") { setParam("range", range.value); connect(); } };
  document.getElementById("apply").onclick = () => {
    const f = document.getElementById("from").value, t = document.getElementById("to").value;
    if (!f || !t) return;
    setParam("range", "custom"); setParam("from", new Date(f).toISOString()); setParam("to", new Date(t).toISOString()); connect();
  };
  const box = document.getElementById("filters");
  for (const dim of D.def.dimensions) {
    const label = document.createElement("label");
    label.innerHTML = `${HR.esc(dim.label)} <select data-testid="filter-${HR.esc(dim.name)}" data-dim="${HR.esc(dim.name)}"><option value="">all</option></select>`;
    box.appendChild(label);
    const select = label.querySelector("select");
    const current = D.params.get("f." + dim.name) || "";
    HR.json(`/api/dashboards/${encodeURIComponent(name)}/dimensions/${encodeURIComponent(dim.name)}/values`).then(r => {
      for (const v of r.values) { const o = document.createElement("option"); o.value = v; o.textContent = v; select.appendChild(o); }
      if (current && !r.values.includes(current)) { const o = document.createElement("option"); o.value = current; o.textContent = current; select.appendChild(o); }
      select.value = current;
    }).catch(() => {});
    select.onchange = () => { setParam("f." + dim.name, select.value); connect(); };
  }
}

async function openDrill(tile, x) {
  const bucket = new Date(x * 1000).toISOString();
  const p = new URLSearchParams({ bucket });
  for (const [k, v] of viewParams()) if (k.startsWith("f.")) p.set(k, v);
  const panel = document.getElementById("drill");
  document.getElementById("drill-title").textContent = `${tile.def.title} · ${new Date(x * 1000).toLocaleString()}`;
  const body = document.getElementById("drill-body");
  body.textContent = "loading…";
  panel.classList.remove("hidden");
  try {
    const r = await HR.json(`/api/dashboards/${encodeURIComponent(name)}/tiles/${encodeURIComponent(tile.def.name)}/drill?` + p.toString());
    body.innerHTML = `<p data-testid="drill-count">${r.rows.length} rows in ${HR.esc(r.table)} from ${HR.esc(new Date(r.from).toLocaleTimeString())} to ${HR.esc(new Date(r.to).toLocaleTimeString())}` +
      (r.ignored_filters.length ? ` (filter not applied: ${HR.esc(r.ignored_filters.join(", "))})` : "") + "</p>" + HR.table(r.columns, r.rows, { accountLinks: true });
  } catch (e) { body.textContent = "drill-down failed: " + e.message; }
}

async function main() {
  await HR.init();
  D.def = await HR.json(`/api/dashboards/${encodeURIComponent(name)}`);
  document.title = `headrace · ${D.def.title}`;
  buildTiles();
  await buildControls();
  document.getElementById("drill-close").onclick = () => document.getElementById("drill").classList.add("hidden");
  connect();
  setInterval(tickLag, 1000);
  window.addEventListener("resize", () => { for (const t of Object.values(D.tiles)) if (t.plot) t.plot.setSize({ width: Math.max(200, t.body.clientWidth - 4), height: 200 }); });
}
main().catch(e => { document.getElementById("grid").textContent = "failed to load: " + e.message; });
