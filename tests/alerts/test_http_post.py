"""The sinks' HTTP client against real servers on loopback: kept-alive, reopened, proxied."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from headrace.alerts.http_post import HttpPoster, PostFailed


class _Server:
    def __init__(self) -> None:
        self.requests: list[tuple[tuple[str, int], str, bytes]] = []
        """(client address, request target, body) per request."""


@contextmanager
def _server(protocol: str = "HTTP/1.1", idle_timeout: float | None = None) -> Iterator[Any]:
    seen = _Server()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = protocol
        timeout = idle_timeout  # closes a kept-alive connection idle this long

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.requests.append((self.client_address, self.path, body))
            self.send_response(201)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _url(server: ThreadingHTTPServer, path: str = "/hook") -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}{path}"


def test_one_connection_is_kept_alive() -> None:
    with _server() as (server, seen):
        poster = HttpPoster(5.0)
        answers = [poster.post(_url(server, "/hook?x=1"), b"%d" % n, {}) for n in range(3)]
        poster.close()
    assert [(a.status, a.body) for a in answers] == [(201, b"ok")] * 3
    assert [(path, body) for _, path, body in seen.requests] == [
        ("/hook?x=1", b"0"),
        ("/hook?x=1", b"1"),
        ("/hook?x=1", b"2"),
    ]
    assert len({address for address, _, _ in seen.requests}) == 1


def test_a_connection_the_server_closed_is_opened_again() -> None:
    # HTTP/1.0: the server closes after every answer; HTTP/1.1 with an idle
    # timeout: it closes a kept-alive connection between two alerts.
    with _server("HTTP/1.0") as (closing, closing_seen), _server(idle_timeout=0.1) as (idle, _):
        poster = HttpPoster(5.0)
        assert [poster.post(_url(closing), b"a", {}).status for _ in range(3)] == [201] * 3
        assert poster.post(_url(idle), b"b", {}).status == 201
        time.sleep(0.4)  # the server has closed the connection meanwhile
        assert poster.post(_url(idle), b"c", {}).status == 201
        poster.close()
    assert len({address for address, _, _ in closing_seen.requests}) == 3


def test_no_server_is_a_failure() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    poster = HttpPoster(2.0)
    with pytest.raises(PostFailed, match="ConnectionRefusedError"):
        poster.post(f"http://127.0.0.1:{port}/hook", b"x", {})


def test_a_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with _server() as (proxy, seen):
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", _url(proxy, ""))
        poster = HttpPoster(5.0)
        answer = poster.post("http://alerts.example.invalid/hook", b"via", {})
        poster.close()
    assert answer.status == 201
    ((_, target, body),) = seen.requests
    assert (target, body) == ("http://alerts.example.invalid/hook", b"via")
