// Admin: users (add/remove) and the admin's own API tokens.
"use strict";
async function refresh() {
  const users = await HR.json("/api/users");
  document.getElementById("users").innerHTML = '<table class="rows"><tr><th>name</th><th>role</th><th></th></tr>' +
    users.map(u => `<tr><td>${HR.esc(u.name)}</td><td>${HR.esc(u.role)}</td><td>${u.name === HR.me.user ? "" : `<button data-remove="${HR.esc(u.name)}">remove</button>`}</td></tr>`).join("") + "</table>";
  const tokens = await HR.json("/api/tokens");
  document.getElementById("tokens").innerHTML = '<table class="rows"><tr><th>id</th><th>label</th><th></th></tr>' +
    tokens.map(t => `<tr><td>${HR.esc(t.id)}</td><td>${HR.esc(t.label)}</td><td><button data-revoke="${HR.esc(t.id)}">revoke</button></td></tr>`).join("") + "</table>";
}
async function main() {
  await HR.init();
  document.body.addEventListener("click", async ev => {
    const r = ev.target.dataset.remove, t = ev.target.dataset.revoke;
    if (r) { await HR.json(`/api/users/${encodeURIComponent(r)}`, { method: "DELETE" }); refresh(); }
    if (t) { await HR.json(`/api/tokens/${encodeURIComponent(t)}`, { method: "DELETE" }); refresh(); }
  });
  document.getElementById("add").onsubmit = async ev => {
    ev.preventDefault();
    const msg = document.getElementById("user-msg");
    try {
      const r = await HR.json("/api/users", { method: "POST", body: { name: document.getElementById("name").value, role: document.getElementById("role").value } });
      msg.textContent = `created ${r.name}; one-time password: ${r.password}`;
      refresh();
    } catch (e) { msg.textContent = e.message; }
  };
  document.getElementById("token").onsubmit = async ev => {
    ev.preventDefault();
    const r = await HR.json("/api/tokens", { method: "POST", body: { label: document.getElementById("label").value } });
    document.getElementById("token-msg").textContent = `new token (shown once): ${r.token}`;
    refresh();
  };
  refresh();
}
main();
