"""Who is asking: sessions (cookie + CSRF) for the UI, bearer tokens for the API.

- A browser logs in with ``POST /api/login`` and gets an HttpOnly, SameSite=Strict
  session cookie. Every unsafe request (POST/PUT/PATCH/DELETE) authenticated by
  that cookie must echo the session's CSRF token in ``X-CSRF-Token`` (the page
  reads it from ``GET /api/me``); a cross-site page can neither read it nor set
  the header without a CORS preflight this server never grants.
- API clients send ``Authorization: Bearer hr_...``; no cookie, so no CSRF.
- With auth disabled (loopback only, enforced at startup) everyone is an admin.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from dataclasses import dataclass

from starlette.requests import Request

from headrace.serve.http import ApiError
from headrace.serve.users import Role, User, UserStore

SESSION_COOKIE = "hr_session"
CSRF_HEADER = "x-csrf-token"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role
    via: str  # "session", "token" or "open" (auth disabled)
    csrf: str = ""

    def allows(self, role: Role) -> bool:
        return self.role >= role


class Authenticator:
    """Resolves a request to a Principal and enforces roles and CSRF."""

    def __init__(self, users: UserStore | None, *, enabled: bool) -> None:
        self.users = users
        self.enabled = enabled
        self._failures: dict[str, deque[float]] = {}

    def identify(self, request: Request) -> Principal | None:
        """The caller, or None when not authenticated."""
        if not self.enabled or self.users is None:
            return Principal("local", Role.ADMIN, "open")
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, secret = header.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                return None
            user = self.users.user_for_token(secret.strip())
            return Principal(user.name, user.role, "token") if user else None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            session = self.users.session(cookie)
            if session is not None:
                return Principal(session.user.name, session.user.role, "session", session.csrf)
        return None

    def require(self, request: Request, role: Role = Role.VIEWER) -> Principal:
        """The caller, with at least ``role``; 401/403 otherwise; CSRF checked for sessions."""
        principal = self.identify(request)
        if principal is None:
            raise ApiError(401, "authentication required", "log in, or send a bearer API token")
        if principal.via == "session" and request.method in _UNSAFE:
            sent = request.headers.get(CSRF_HEADER, "")
            if not sent or not hmac.compare_digest(sent, principal.csrf):
                raise ApiError(
                    403, "missing or wrong CSRF token", "send the X-CSRF-Token from /api/me"
                )
        if not principal.allows(role):
            raise ApiError(
                403,
                f"the {principal.role.label} role cannot do this (needs {role.label})",
                "ask an admin for a role with access",
            )
        return principal

    def throttled(self, key: str, *, limit: int = 5, window_s: float = 60.0) -> bool:
        """True when ``key`` failed to log in ``limit`` times within the window."""
        now = time.monotonic()
        recent = self._failures.get(key)
        if recent is None:
            return False
        while recent and now - recent[0] > window_s:
            recent.popleft()
        return len(recent) >= limit

    def record_failure(self, key: str) -> None:
        """Count a failed login for ``key``."""
        self._failures.setdefault(key, deque(maxlen=50)).append(time.monotonic())

    def login(self, name: str, password: str) -> User | None:
        """Check a password (slow on purpose)."""
        if self.users is None:
            return None
        return self.users.verify_password(name, password)
