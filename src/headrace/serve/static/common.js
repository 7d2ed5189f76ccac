// Shared helpers of every page: session, CSRF, JSON fetch, header, formatting.
"use strict";
const HR = {
  me: null,
  async api(path, options = {}) {
    const opts = { credentials: "same-origin", ...options, headers: { ...(options.headers || {}) } };
    if (opts.body !== undefined && typeof opts.body !== "string") {
      opts.body = JSON.stringify(opts.body);
      opts.headers["Content-Type"] = "application/json";
    }
    if (opts.method && opts.method !== "GET" && HR.me && HR.me.csrf) opts.headers["X-CSRF-Token"] = HR.me.csrf;
    const res = await fetch(path, opts);
    if (res.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); throw new Error("login required"); }
    return res;
  },
  async json(path, options) {
    const res = await HR.api(path, options);
    const body = await res.json().catch(() => ({ error: res.statusText }));
    if (!res.ok) throw new Error(body.error || res.statusText);
    return body;
  },
  async init(active) {
    HR.me = await HR.json("/api/me");
    const header = document.createElement("header");
    header.className = "top";
    const links = HR.me.dashboards.map(d => `<a href="/dashboard/${encodeURIComponent(d.name)}" data-nav="dashboard-${HR.esc(d.name)}">${HR.esc(d.title)}</a>`);
    if (HR.me.can_sql) links.push('<a href="/sql" data-nav="sql">SQL</a>');
    if (HR.me.can_admin) links.push('<a href="/admin" data-nav="admin">Admin</a>');
    header.innerHTML = `<span class="brand">headrace</span><nav>${links.join("")}</nav>` +
      `<span class="who" data-testid="who">${HR.esc(HR.me.user)} · ${HR.esc(HR.me.role)}</span>` +
      (HR.me.auth === "session" ? '<button id="logout">Log out</button>' : "");
    document.body.prepend(header);
    const out = document.getElementById("logout");
    if (out) out.onclick = async () => { await HR.api("/api/logout", { method: "POST" }); location.href = "/login"; };
    return HR.me;
  },
  esc(v) { return String(v ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); },
  fmt(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "number") return Math.abs(v) >= 1000 ? v.toLocaleString(undefined, { maximumFractionDigits: 0 }) : v.toLocaleString(undefined, { maximumFractionDigits: 2 });
    if (typeof v === "string" && /^\d{4}-\d\d-\d\dT/.test(v)) return new Date(v).toLocaleString();
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  },
  table(columns, rows, opts = {}) {
    const names = columns.map(c => c.name);
    const head = names.map(n => `<th>${HR.esc(n)}</th>`).join("");
    const body = rows.map(r => "<tr>" + r.map((v, i) => {
      if (opts.accountLinks && names[i] === "account_id" && v !== null) return `<td><a href="/account/${encodeURIComponent(v)}">${HR.esc(v)}</a></td>`;
      const cls = names[i] === "severity" ? ` class="sev-${HR.esc(v)}"` : "";
      const isId = names[i] === "id" || names[i].endsWith("_id");
      return `<td${cls}>${HR.esc(isId && v !== null ? String(v) : HR.fmt(v))}</td>`;
    }).join("") + "</tr>").join("");
    return `<table class="rows"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
  },
  lagText(asOf) {
    // No source position in the store (none committed yet, or not a pipeline store).
    if (!asOf) return { text: "as of unknown", stale: true };
    const s = Math.max(0, (Date.now() - Date.parse(asOf)) / 1000);
    const t = s < 90 ? s.toFixed(1) + " s" : s < 5400 ? (s / 60).toFixed(0) + " min" : (s / 3600).toFixed(1) + " h";
    return { text: `as of ${new Date(asOf).toLocaleTimeString()} · lag ${t}`, stale: s > 60 };
  },
};
