"""A local webhook receiver for ``headrace bench fraud``: records each alert when it arrives.

A threaded HTTP server on 127.0.0.1 that answers every ``POST`` with 200,
checks the HMAC signature (``X-Headrace-Signature`` over
``<X-Headrace-Timestamp>.<body>``, see :mod:`headrace.alerts.message`), and
keeps, per delivery, the wall-clock time it was received, the JSON
document and whether the signature was right. Copies of one alert (same
``Idempotency-Key``) are counted, and only the first one is kept.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from headrace.alerts.message import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)


@dataclass(frozen=True)
class Received:
    """One alert as the receiver got it."""

    received_at: float
    """Unix time (``time.time()``) when the request's body had been read."""
    document: dict[str, Any]
    signed: bool
    """The signature header matched the body and the secret."""


class WebhookReceiver:
    """The receiver (module docstring); use as a context manager."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.alerts: dict[str, Received] = {}
        """First delivery of each alert, by idempotency key."""
        self.duplicates = 0
        self.requests = 0
        self._lock = threading.Lock()
        self.last_at = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as real receivers do: a new connection per alert would put
            # TCP setup and a new handler thread into every measured latency.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                now = time.time()
                receiver.record(body, dict(self.headers.items()), now)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bench-webhook", daemon=True
        )

    @property
    def url(self) -> str:
        """Where to send alerts."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def record(self, body: bytes, headers: dict[str, str], received_at: float) -> None:
        """Keep one delivery (called by the handler threads)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
        expected = sign(self.secret, timestamp, body)
        signed = hmac.compare_digest(expected, lowered.get(SIGNATURE_HEADER.lower(), ""))
        try:
            document = json.loads(body)
        except ValueError:
            document = {}
        key = lowered.get(IDEMPOTENCY_HEADER.lower()) or str(document.get("id"))
        with self._lock:
            self.requests += 1
            self.last_at = received_at
            if key in self.alerts:
                self.duplicates += 1
            else:
                self.alerts[key] = Received(received_at, document, signed)

    def received(self) -> list[Received]:
        """Every alert received so far (first copies)."""
        with self._lock:
            return list(self.alerts.values())

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
