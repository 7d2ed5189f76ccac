"""Real local receivers for alert sinks: an HTTP server and an SMTP server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    """One HTTP request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    received_at: float = field(default_factory=time.time)


@dataclass
class HttpReceiver:
    """Answers each POST with the next scripted status (then ``default``), recording it."""

    statuses: list[int] = field(default_factory=list)
    default: int = 200
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    arrived: threading.Event = field(default_factory=threading.Event)

    def answer(self, request: Received) -> int:
        with self.lock:
            self.requests.append(request)
            status = self.statuses.pop(0) if self.statuses else self.default
            request.status = status
        self.arrived.set()
        return status

    def accepted(self) -> list[Received]:
        """Requests answered 2xx."""
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]


@contextmanager
def http_receiver(statuses: list[int] | None = None, default: int = 200) -> Iterator[HttpReceiver]:
    """An HTTP server on 127.0.0.1 (a free port) for the duration of the block."""
    receiver = HttpReceiver(list(statuses or []), default)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status = receiver.answer(Received(self.path, dict(self.headers.items()), body))
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status < 300 else b"nope")

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class SmtpReceiver:
    """Messages accepted by the SMTP server; ``fail_first`` answers 451 that many times;
    ``refuse`` (an SMTP reply, e.g. ``554 ...``) answers every message with it."""

    fail_first: int = 0
    refuse: str | None = None
    messages: list[Message] = field(default_factory=list)
    refused: int = 0
    port: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.refuse is not None:
            self.refused += 1
            return self.refuse
        if self.refused < self.fail_first:
            self.refused += 1
            return "451 4.3.0 try again later"
        self.messages.append(message_from_bytes(envelope.content))
        self.arrived.set()
        return "250 OK"


@contextmanager
def smtp_receiver(fail_first: int = 0, refuse: str | None = None) -> Iterator[SmtpReceiver]:
    """An aiosmtpd server on 127.0.0.1 for the duration of the block."""
    handler = SmtpReceiver(fail_first, refuse)
    with socket.socket() as probe:  # a free port (aiosmtpd cannot be given port 0)
        probe.bind(("127.0.0.1", 0))
        handler.port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=handler.port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()
