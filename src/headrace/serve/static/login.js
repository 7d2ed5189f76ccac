"use strict";
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const err = document.getElementById("error");
  err.textContent = "";
  const res = await fetch("/api/login", {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: document.getElementById("username").value, password: document.getElementById("password").value }),
  });
  if (!res.ok) { const body = await res.json().catch(() => ({})); err.textContent = body.error || "login failed"; return; }
  const next = new URLSearchParams(location.search).get("next") || "/";
  location.href = next.startsWith("/") && !next.startsWith("//") ? next : "/";
});
