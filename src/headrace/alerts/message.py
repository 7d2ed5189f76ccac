"""What a sink sends: one alert as a JSON document, a Slack message or an email.

The JSON document (webhook body)::

    {"id": 42, "rule": "velocity_burst", "kind": "fraud", "status": "firing",
     "severity": "high", "account_id": 1234, "key": "velocity_burst:1234",
     "summary": "9 transactions in 60 s on account 1234 (limit 8)",
     "started_at": "...", "detected_at": "...", "event_at": "...",
     "commit_ts": "...", "latency_ms": 41.5, "payload": {...},
     "idempotency_key": "hr-..."}

Times are ISO 8601 in UTC. ``payload`` holds the numbers that crossed the
threshold and the evidence rows. ``idempotency_key`` is the same for every
attempt to deliver this alert to this sink, before and after a restart.

Signature (webhook with a secret): ``X-Headrace-Signature: sha256=<hex>``
where ``<hex>`` is HMAC-SHA256(secret, ``<X-Headrace-Timestamp>.<body>``).
A receiver recomputes it over the raw body and rejects old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Any

SIGNATURE_HEADER = "X-Headrace-Signature"
TIMESTAMP_HEADER = "X-Headrace-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Alert:
    """One alert as read from ``headrace.alerts``, ready to send."""

    id: int
    rule: str
    kind: str
    status: str
    severity: str
    account_id: int | None
    key: str
    summary: str | None
    started_at: datetime | None
    detected_at: datetime
    event_at: datetime | None
    commit_ts: datetime | None
    latency_ms: float | None
    payload: dict[str, Any]
    idempotency_key: str

    def document(self) -> dict[str, Any]:
        """The JSON document of the alert (module docstring)."""
        return {
            "id": self.id,
            "rule": self.rule,
            "kind": self.kind,
            "status": self.status,
            "severity": self.severity,
            "account_id": self.account_id,
            "key": self.key,
            "summary": self.summary,
            "started_at": _iso(self.started_at),
            "detected_at": _iso(self.detected_at),
            "event_at": _iso(self.event_at),
            "commit_ts": _iso(self.commit_ts),
            "latency_ms": self.latency_ms,
            "payload": self.payload,
            "idempotency_key": self.idempotency_key,
        }

    def body(self) -> bytes:
        """The document as compact UTF-8 JSON (what is signed and sent)."""
        return json.dumps(self.document(), separators=(",", ":"), default=str).encode()

    @property
    def title(self) -> str:
        state = " resolved" if self.status == "resolved" else ""
        return f"[{self.severity}] {self.rule}{state}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Headrace-Signature`` value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is right (constant-time comparison); for receivers and tests."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def slack_message(alert: Alert) -> dict[str, Any]:
    """A Slack-compatible incoming-webhook message (``text`` plus ``blocks``)."""
    text = f"{alert.title}: {alert.summary or alert.key}"
    fields = [
        f"*Rule*\n{alert.rule}",
        f"*Severity*\n{alert.severity}",
        f"*Key*\n{alert.key}",
        f"*Detected*\n{_iso(alert.detected_at)}",
    ]
    if alert.account_id is not None:
        fields.append(f"*Account*\n{alert.account_id}")
    numbers = alert.payload.get("numbers")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{text}*"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
    ]
    if numbers:
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": "`" + json.dumps(numbers, default=str) + "`"}
                ],
            }
        )
    return {"text": text, "blocks": blocks}


def email_message(alert: Alert, sender: str, to: list[str], prefix: str) -> EmailMessage:
    """One plain-text email; its Message-ID comes from the idempotency key."""
    message = EmailMessage()
    message["Subject"] = f"{prefix} {alert.title}: {alert.summary or alert.key}"
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Message-ID"] = f"<{alert.idempotency_key}@headrace>"
    message["X-Headrace-Alert-Id"] = str(alert.id)
    lines = [
        alert.summary or alert.key,
        "",
        f"rule:        {alert.rule} ({alert.kind}, {alert.status})",
        f"severity:    {alert.severity}",
        f"key:         {alert.key}",
        f"account:     {alert.account_id if alert.account_id is not None else '-'}",
        f"started at:  {_iso(alert.started_at)}",
        f"detected at: {_iso(alert.detected_at)}",
        "",
        json.dumps(alert.payload, indent=2, default=str),
    ]
    message.set_content("\n".join(lines))
    return message
