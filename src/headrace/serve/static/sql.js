// The SQL editor: run, cancel, download; the schema browser inserts names.
"use strict";
let running = null;
const $ = id => document.getElementById(id);

async function loadSchema() {
  const schema = await HR.json("/api/schema");
  const box = $("schema");
  box.innerHTML = "";
  for (const [name, relations] of Object.entries(schema)) {
    const d = document.createElement("details");
    d.open = name !== "history";
    d.innerHTML = `<summary>${HR.esc(name)}</summary>` + relations.map(r =>
      `<details><summary data-insert="${HR.esc(name + "." + r.name)}">${HR.esc(r.name)} <small>${HR.esc(r.kind)}</small></summary>` +
      r.columns.map(c => `<div class="col${c.masked ? " masked" : ""}" data-insert="${HR.esc(c.name)}" title="${HR.esc(c.type)}">${HR.esc(c.name)} <small>${HR.esc(c.type)}</small></div>`).join("") + "</details>").join("");
    box.appendChild(d);
  }
  box.addEventListener("dblclick", ev => {
    const t = ev.target.closest("[data-insert]");
    if (!t) return;
    const ta = $("sql"), s = ta.selectionStart;
    ta.value = ta.value.slice(0, s) + t.dataset.insert + ta.value.slice(ta.selectionEnd);
    ta.focus();
  });
}

async function run(format) {
  $("error").textContent = "";
  const id = "q" + Math.random().toString(36).slice(2, 10);
  running = id;
  $("cancel").disabled = false;
  $("info").textContent = "running…";
  const started = performance.now();
  try {
    const res = await HR.api("/api/sql", { method: "POST", body: { sql: $("sql").value, format, query_id: id } });
    if (!res.ok) {
      const body = await res.json().catch(() => ({ error: res.statusText }));
      $("error").textContent = body.error;
      $("info").textContent = `failed (${res.status})`;
      return;
    }
    if (format === "json") {
      const r = await res.json();
      $("result").innerHTML = HR.table(r.columns, r.rows, { accountLinks: true });
      $("info").textContent = `${r.rows.length} rows${r.truncated ? " (truncated)" : ""} · ${r.elapsed_ms} ms` + (r.masked.length ? ` · masked: ${r.masked.join(", ")}` : "");
    } else {
      const blob = await res.blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `query.${format}`;
      document.body.appendChild(a);
      a.click();
      setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
      $("info").textContent = `downloaded ${res.headers.get("X-Headrace-Rows")} rows as ${format} · ${Math.round(performance.now() - started)} ms`;
    }
  } finally {
    running = null;
    $("cancel").disabled = true;
  }
}

async function main() {
  await HR.init();
  $("run").onclick = () => run("json");
  $("csv").onclick = () => run("csv");
  $("parquet").onclick = () => run("parquet");
  $("cancel").onclick = () => { if (running) HR.api("/api/sql/cancel", { method: "POST", body: { query_id: running } }); };
  $("sql").addEventListener("keydown", ev => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); run("json"); } });
  await loadSchema();
}
main().catch(e => { $("error").textContent = e.message; });
