"""Login, logout, the current user, API tokens, user administration and config."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from headrace import __version__
from headrace.errors import ConfigError
from headrace.serve.auth import SESSION_COOKIE
from headrace.serve.http import ApiError, json_response, parse_body
from headrace.serve.openapi import ApiRoute, Param
from headrace.serve.state import ServeState, state
from headrace.serve.users import Role, UserStore


class LoginRequest(BaseModel):
    """Credentials."""

    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class NewUser(BaseModel):
    """A user to create."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "analyst", "admin"]
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class NewToken(BaseModel):
    """An API token to create for yourself."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=100)


def _users(st: ServeState) -> UserStore:
    if st.users is None:
        raise ApiError(
            409, "authentication is disabled on this server", "enable auth to manage users"
        )
    return st.users


async def login(request: Request) -> Response:
    st = state(request)
    body = await parse_body(request, LoginRequest)
    users = _users(st)
    client = request.client.host if request.client else "?"
    key = f"{client}:{body.username}"
    if st.auth.throttled(key):
        raise ApiError(429, "too many failed logins", "wait a minute and try again")
    user = await asyncio.to_thread(st.auth.login, body.username, body.password)
    if user is None:
        st.auth.record_failure(key)
        raise ApiError(401, "wrong user name or password")
    session_id, session = users.create_session(user, st.settings.auth.session_ttl_s)
    response = json_response({"user": user.name, "role": user.role.label, "csrf": session.csrf})
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=st.settings.auth.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=st.settings.auth.cookie_secure,
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    if principal.via == "session" and cookie and st.users is not None:
        st.users.end_session(cookie)
    response = json_response({"ok": True})
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def me(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    return json_response(
        {
            "user": principal.name,
            "role": principal.role.label,
            "csrf": principal.csrf,
            "auth": principal.via,
            "can_sql": principal.allows(Role.ANALYST),
            "can_admin": principal.allows(Role.ADMIN),
            "dashboards": [{"name": d.name, "title": d.title} for d in st.settings.dashboards],
            "version": __version__,
        }
    )


async def list_users(request: Request) -> Response:
    st = state(request)
    st.auth.require(request, Role.ADMIN)
    return json_response(
        [
            {"name": u.name, "role": u.role.label, "created_at": u.created_at}
            for u in _users(st).all()
        ]
    )


async def add_user(request: Request) -> Response:
    st = state(request)
    st.auth.require(request, Role.ADMIN)
    body = await parse_body(request, NewUser)
    try:
        password = await asyncio.to_thread(
            _users(st).add, body.name, Role.parse(body.role), body.password
        )
    except ConfigError as exc:
        raise ApiError(409 if "exists" in exc.what else 400, exc.what, exc.fix) from None
    reply: dict[str, str] = {"name": body.name, "role": body.role}
    if body.password is None:
        reply["password"] = password
    return json_response(reply, status=201)


async def remove_user(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request, Role.ADMIN)
    name = request.path_params["name"]
    if name == principal.name:
        raise ApiError(400, "you cannot remove yourself")
    if not _users(st).remove(name):
        raise ApiError(404, f"no user {name!r}")
    return json_response({"removed": name})


async def list_tokens(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    everyone = request.query_params.get("all") == "1" and principal.allows(Role.ADMIN)
    return json_response(_users(st).tokens(None if everyone else principal.name))


async def create_token(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    body = await parse_body(request, NewToken)
    token_id, secret = _users(st).create_token(principal.name, body.label)
    return json_response({"id": token_id, "token": secret}, status=201)


async def revoke_token(request: Request) -> Response:
    st = state(request)
    principal = st.auth.require(request)
    owner = None if principal.allows(Role.ADMIN) else principal.name
    if not _users(st).revoke_token(request.path_params["id"], owner):
        raise ApiError(404, "no such token")
    return json_response({"revoked": request.path_params["id"]})


async def config(request: Request) -> Response:
    st = state(request)
    st.auth.require(request, Role.ADMIN)
    return json_response(st.settings.model_dump(mode="json"))


def routes() -> list[ApiRoute]:
    """Authentication and administration routes."""
    return [
        ApiRoute(
            "POST",
            "/api/login",
            login,
            "Log in; sets the session cookie, returns the CSRF token",
            role="public",
            body=LoginRequest,
            tags=("auth",),
        ),
        ApiRoute("POST", "/api/logout", logout, "Log out", tags=("auth",)),
        ApiRoute("GET", "/api/me", me, "The current user, role and CSRF token", tags=("auth",)),
        ApiRoute(
            "GET",
            "/api/tokens",
            list_tokens,
            "Your API tokens (admins: ?all=1)",
            params=(Param("all"),),
            tags=("auth",),
        ),
        ApiRoute(
            "POST",
            "/api/tokens",
            create_token,
            "Create an API token (shown once)",
            body=NewToken,
            tags=("auth",),
        ),
        ApiRoute(
            "DELETE",
            "/api/tokens/{id}",
            revoke_token,
            "Revoke an API token",
            params=(Param("id", "path"),),
            tags=("auth",),
        ),
        ApiRoute("GET", "/api/users", list_users, "List users", role="admin", tags=("admin",)),
        ApiRoute(
            "POST",
            "/api/users",
            add_user,
            "Create a user (password generated if omitted)",
            role="admin",
            body=NewUser,
            tags=("admin",),
        ),
        ApiRoute(
            "DELETE",
            "/api/users/{name}",
            remove_user,
            "Remove a user",
            role="admin",
            params=(Param("name", "path"),),
            tags=("admin",),
        ),
        ApiRoute(
            "GET",
            "/api/config",
            config,
            "The effective serve settings",
            role="admin",
            tags=("admin",),
        ),
    ]
