"""HTTP plumbing shared by the routes: JSON errors, body parsing, the body-size limit."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ModelT = TypeVar("ModelT", bound=BaseModel)


class ApiError(Exception):
    """An error answered as ``{"error": message, "fix": hint}`` with an HTTP status."""

    def __init__(self, status: int, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fix = fix

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message}
        if self.fix:
            body["fix"] = self.fix
        return JSONResponse(body, status_code=self.status)


def dumps(value: Any) -> bytes:
    """Compact JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class JsonBytes(Response):
    """A JSON response from already-encoded bytes."""

    media_type = "application/json"


def json_response(value: Any, status: int = 200) -> Response:
    """Compact JSON response."""
    return JsonBytes(dumps(value), status_code=status)


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """Parse and validate a JSON body, or raise a 400/415 with the reason."""
    content_type = request.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().lower() == "application/json":
        raise ApiError(415, "the body must be JSON", "send Content-Type: application/json")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(422, f"invalid request: {problems}") from None


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"parameter {name!r} must be an integer, not {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"parameter {name!r} must be between {lo} and {hi}")
    return value


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.max_bytes + 1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        seen = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLargeError:
            if not response_started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = dumps({"error": f"request body larger than {self.max_bytes} bytes"})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLargeError(Exception):
    pass
