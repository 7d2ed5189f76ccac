"""Users, API tokens and login sessions, kept in a small SQLite side file.

Why not in the DuckDB store: DuckDB allows one writing process, and the store
is held by ``headrace run`` (or opened read-only by ``headrace serve``). Users
must be manageable (``headrace user add``) and sessions writable in both cases,
so they live beside the store in ``<store>.users.sqlite`` (SQLite handles
several processes). Passwords are hashed with Argon2id (argon2-cffi); tokens and
session ids are random 256-bit secrets stored only as SHA-256 hashes.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from headrace.errors import ConfigError

TOKEN_PREFIX = "hr_"  # noqa: S105 - the public prefix of API tokens, not a secret
# A token's last_used_at is written at most this often: the write (a SQLite commit,
# an fsync) ran on the event loop for every request, stalling every live stream.
TOKEN_USE_RESOLUTION_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    last_used_at REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""


class Role(IntEnum):
    """Roles, each allowed what the ones below it are."""

    VIEWER = 1  # dashboards and read API
    ANALYST = 2  # + SQL
    ADMIN = 3  # + users and config

    @classmethod
    def parse(cls, text: str) -> Role:
        """``viewer`` / ``analyst`` / ``admin``."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ConfigError(
                f"unknown role {text!r}", "use one of: viewer, analyst, admin"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class User:
    """A user without secrets."""

    name: str
    role: Role
    created_at: float


@dataclass(frozen=True)
class Session:
    """A login session: who, and the CSRF token its unsafe requests must echo."""

    user: User
    csrf: str
    expires_at: float


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class UserStore:
    """Users, tokens and sessions in one SQLite file (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, check_same_thread=False, timeout=10)
        self._con.execute("PRAGMA foreign_keys = ON")
        self._con.execute("PRAGMA journal_mode = WAL")
        self._con.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._hasher = PasswordHasher()
        self._dummy: str | None = None
        self._use_written: dict[int, float] = {}  # token id -> when last_used_at was written

    @property
    def _dummy_hash(self) -> str:
        # Verifying unknown users against a dummy hash keeps login timing even; made
        # on first use because hashing is slow on purpose.
        if self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_hex(16))
        return self._dummy

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._con.close()

    # users -----------------------------------------------------------------

    def add(self, name: str, role: Role, password: str | None = None) -> str:
        """Create a user; returns the password (generated when not given)."""
        if (
            not name
            or len(name) > 64
            or not name.replace("_", "").replace("-", "").replace(".", "").isalnum()
        ):
            raise ConfigError(
                f"invalid user name {name!r}", "use letters, digits, '.', '-' or '_' (≤ 64)"
            )
        password = _new_password(password)
        hashed = self._hasher.hash(password)
        with self._lock:
            try:
                self._con.execute(
                    "INSERT INTO users VALUES (?, ?, ?, ?)", (name, role.label, hashed, time.time())
                )
                self._con.commit()
            except sqlite3.IntegrityError:
                raise ConfigError(
                    f"user {name!r} already exists", "remove it first or pick another name"
                ) from None
        return password

    def set_password(self, name: str, password: str | None = None) -> str:
        """Replace a user's password (generated when not given) and end their sessions;
        returns the password."""
        password = _new_password(password)
        hashed = self._hasher.hash(password)
        with self._lock:
            cur = self._con.execute(
                "UPDATE users SET password_hash = ? WHERE name = ?", (hashed, name)
            )
            self._con.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
            self._con.commit()
        if cur.rowcount == 0:
            raise ConfigError(f"no user {name!r}", "see 'headrace user list'")
        return password

    def remove(self, name: str) -> bool:
        """Delete a user with their tokens and sessions; False when there was none."""
        with self._lock:
            cur = self._con.execute("DELETE FROM users WHERE name = ?", (name,))
            self._con.commit()
        return cur.rowcount > 0

    def all(self) -> list[User]:
        """All users by name."""
        with self._lock:
            rows = self._con.execute(
                "SELECT name, role, created_at FROM users ORDER BY name"
            ).fetchall()
        return [User(n, Role.parse(r), c) for n, r, c in rows]

    def get(self, name: str) -> User | None:
        """The user called ``name``."""
        with self._lock:
            row = self._con.execute(
                "SELECT name, role, created_at FROM users WHERE name = ?", (name,)
            ).fetchone()
        return User(row[0], Role.parse(row[1]), row[2]) if row else None

    def count(self) -> int:
        """How many users exist."""
        with self._lock:
            row = self._con.execute("SELECT count(*) FROM users").fetchone()
        return int(row[0])

    def verify_password(self, name: str, password: str) -> User | None:
        """The user when the password matches (slow on purpose: Argon2)."""
        with self._lock:
            row = self._con.execute(
                "SELECT name, role, created_at, password_hash FROM users WHERE name = ?", (name,)
            ).fetchone()
        stored = row[3] if row else self._dummy_hash
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if self._hasher.check_needs_rehash(stored):
            self.set_password(name, password)
        return User(row[0], Role.parse(row[1]), row[2])

    # tokens ----------------------------------------------------------------

    def create_token(self, user: str, label: str = "") -> tuple[str, str]:
        """A new API token for ``user``: returns (token id, secret shown once)."""
        token_id = secrets.token_hex(4)
        secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        with self._lock:
            try:
                self._con.execute(
                    "INSERT INTO tokens (id, user_name, token_hash, label, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (token_id, user, _digest(secret), label[:100], time.time()),
                )
                self._con.commit()
            except sqlite3.IntegrityError:
                raise ConfigError(f"no user {user!r}", "create the user first") from None
        return token_id, secret

    def tokens(self, user: str | None = None) -> list[dict[str, object]]:
        """Token metadata (never the secrets)."""
        sql = "SELECT id, user_name, label, created_at, last_used_at FROM tokens"
        args: tuple[str, ...] = ()
        if user is not None:
            sql += " WHERE user_name = ?"
            args = (user,)
        with self._lock:
            rows = self._con.execute(sql + " ORDER BY created_at", args).fetchall()
        keys = ("id", "user", "label", "created_at", "last_used_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def revoke_token(self, token_id: str, user: str | None = None) -> bool:
        """Delete a token (only ``user``'s when given)."""
        sql, args = "DELETE FROM tokens WHERE id = ?", [token_id]
        if user is not None:
            sql += " AND user_name = ?"
            args.append(user)
        with self._lock:
            cur = self._con.execute(sql, args)
            self._con.commit()
        return cur.rowcount > 0

    def user_for_token(self, secret: str) -> User | None:
        """The token's owner, when the token is valid."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        with self._lock:
            row = self._con.execute(
                "SELECT u.name, u.role, u.created_at, t.id FROM tokens t "
                "JOIN users u ON u.name = t.user_name WHERE t.token_hash = ?",
                (_digest(secret),),
            ).fetchone()
            now = time.time()
            if row is not None and now - self._use_written.get(row[3], 0.0) >= (
                TOKEN_USE_RESOLUTION_S
            ):
                self._use_written[row[3]] = now
                self._con.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, row[3]))
                self._con.commit()
        return User(row[0], Role.parse(row[1]), row[2]) if row else None

    # sessions --------------------------------------------------------------

    def create_session(self, user: User, ttl_s: int) -> tuple[str, Session]:
        """A new session: returns (cookie value, session)."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        now = time.time()
        with self._lock:
            self._con.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            self._con.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                (_digest(session_id), user.name, csrf, now, now + ttl_s),
            )
            self._con.commit()
        return session_id, Session(user, csrf, now + ttl_s)

    def session(self, session_id: str) -> Session | None:
        """The live session behind a cookie value."""
        with self._lock:
            row = self._con.execute(
                "SELECT u.name, u.role, u.created_at, s.csrf, s.expires_at FROM sessions s "
                "JOIN users u ON u.name = s.user_name WHERE s.id_hash = ?",
                (_digest(session_id),),
            ).fetchone()
        if row is None or row[4] < time.time():
            return None
        return Session(User(row[0], Role.parse(row[1]), row[2]), row[3], row[4])

    def end_session(self, session_id: str) -> None:
        """Log out."""
        with self._lock:
            self._con.execute("DELETE FROM sessions WHERE id_hash = ?", (_digest(session_id),))
            self._con.commit()


def _new_password(password: str | None) -> str:
    """``password``, or a generated one when None; refused when too short (an empty one
    too: generating it would give a password nobody was shown)."""
    password = secrets.token_urlsafe(15) if password is None else password
    if len(password) < 8:
        raise ConfigError("password too short", "use at least 8 characters")
    return password
