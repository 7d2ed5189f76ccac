// The account page: the account row, its health history, transactions and alerts.
"use strict";
const accountId = decodeURIComponent(location.pathname.split("/").pop());

function section(id, data) {
  const el = document.getElementById(id);
  if (data.note) { el.innerHTML = `<p class="note">${HR.esc(data.note)}</p>`; return; }
  el.innerHTML = data.rows.length ? HR.table(data.columns, data.rows) : "<p>none</p>";
}

async function main() {
  await HR.init();
  document.getElementById("title").textContent = `Account ${accountId}`;
  document.title = `headrace · account ${accountId}`;
  const r = await HR.json(`/api/accounts/${encodeURIComponent(accountId)}`);
  const acc = document.getElementById("account");
  if (r.account.rows && r.account.rows.length) {
    acc.innerHTML = r.account.columns.map((c, i) => `<span class="k">${HR.esc(c.name)}</span><span>${HR.esc(HR.fmt(r.account.rows[0][i]))}</span>`).join("");
  } else acc.textContent = r.account.note || "no such account";
  section("transactions", r.transactions);
  section("alerts", r.alerts);
  const h = r.health;
  const el = document.getElementById("health");
  if (h.note || !h.rows.length) { el.textContent = h.note || "no health scores yet"; return; }
  const names = h.columns.map(c => c.name);
  const ti = names.indexOf("scored_at"), si = names.indexOf("score");
  new uPlot({ width: Math.max(200, el.clientWidth - 4), height: 180, series: [{}, { label: "score", stroke: "#3fb950", width: 2 }],
    axes: [{ stroke: "#8b98a5" }, { stroke: "#8b98a5" }], scales: { y: { range: [0, 100] } } },
    [h.rows.map(x => Date.parse(x[ti]) / 1000), h.rows.map(x => x[si])], el);
}
main().catch(e => { document.querySelector("main").textContent = "failed to load: " + e.message; });
