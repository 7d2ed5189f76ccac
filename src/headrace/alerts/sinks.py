"""Sinks: send one alert somewhere, or say why not and whether to try again.

Each sink's :meth:`Sink.send` either returns (delivered) or raises
:class:`DeliveryFailed` with ``retry`` telling the delivery loop whether the
failure may pass (network error, timeout, HTTP 408/429/5xx, SMTP 4xx) or
will not (HTTP 4xx, SMTP 5xx, a missing secret).
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import time
from abc import ABC, abstractmethod

from headrace.alerts.config import (
    EmailSinkConfig,
    LogSinkConfig,
    SinkConfig,
    SlackSinkConfig,
    WebhookSinkConfig,
)
from headrace.alerts.http_post import HttpPoster, PostFailed
from headrace.alerts.message import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Alert,
    email_message,
    sign,
    slack_message,
)

log = logging.getLogger("headrace.alerts")

RETRYABLE_STATUS = frozenset({408, 425, 429})


class DeliveryFailed(Exception):  # noqa: N818 - reads as "delivery failed", an outcome
    """One attempt failed; ``retry`` says whether a later attempt may succeed."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


class Sink(ABC):
    """Where alerts go; one instance per configured sink, used by one thread."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    def send(self, alert: Alert) -> None:
        """Deliver ``alert`` or raise :class:`DeliveryFailed`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class _HttpSink(Sink):
    def __init__(self, config: WebhookSinkConfig | SlackSinkConfig) -> None:
        super().__init__(config)
        self.poster = HttpPoster(config.timeout.total_seconds())

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            answer = self.poster.post(url, body, headers)
        except PostFailed as exc:
            raise DeliveryFailed(str(exc), retry=True) from exc
        if 200 <= answer.status < 300:
            return
        retry = answer.status >= 500 or answer.status in RETRYABLE_STATUS
        text = answer.body[:200].decode("utf-8", errors="replace")
        raise DeliveryFailed(f"HTTP {answer.status}: {text}", retry=retry)

    def close(self) -> None:
        self.poster.close()


class WebhookSink(_HttpSink):
    """HTTP POST of the alert's JSON document, HMAC-signed (see :mod:`.message`)."""

    config: WebhookSinkConfig

    def send(self, alert: Alert) -> None:
        body = alert.body()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "headrace-alerts/1",
            IDEMPOTENCY_HEADER: alert.idempotency_key,
            **self.config.headers,
        }
        secret = self.config.resolved_secret()
        if self.config.secret_env is not None and secret is None:
            raise DeliveryFailed(
                f"environment variable {self.config.secret_env} (the HMAC key) is not set",
                retry=False,
            )
        if secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        self.post(self.config.url, body, headers)


class SlackSink(_HttpSink):
    """A Slack-compatible incoming webhook."""

    config: SlackSinkConfig

    def send(self, alert: Alert) -> None:
        url = self.config.resolved_url()
        if url is None:
            raise DeliveryFailed(
                f"environment variable {self.config.url_env} (the webhook URL) is not set",
                retry=False,
            )
        body = json.dumps(slack_message(alert)).encode()
        self.post(
            url,
            body,
            {
                "Content-Type": "application/json",
                "User-Agent": "headrace-alerts/1",
                IDEMPOTENCY_HEADER: alert.idempotency_key,
            },
        )


class EmailSink(Sink):
    """One email per alert over SMTP."""

    config: EmailSinkConfig

    def send(self, alert: Alert) -> None:
        config = self.config
        message = email_message(alert, config.sender, config.to, config.subject_prefix)
        timeout = config.timeout.total_seconds()
        try:
            smtp: smtplib.SMTP
            if config.security == "ssl":
                smtp = smtplib.SMTP_SSL(
                    config.host, config.port, timeout=timeout, context=ssl.create_default_context()
                )
            else:
                smtp = smtplib.SMTP(config.host, config.port, timeout=timeout)
            with smtp:
                if config.security == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if config.username is not None:
                    smtp.login(config.username, config.resolved_password() or "")
                smtp.send_message(message)
        except smtplib.SMTPResponseException as exc:
            raise DeliveryFailed(
                f"SMTP {exc.smtp_code}: {exc.smtp_error!r}", retry=400 <= exc.smtp_code < 500
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryFailed(f"recipients refused: {exc.recipients}", retry=False) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}", retry=True) from exc


class LogSink(Sink):
    """A log line per alert (logger ``headrace.alerts``)."""

    config: LogSinkConfig

    def send(self, alert: Alert) -> None:
        level = logging.getLevelName(self.config.level.upper())
        log.log(
            level,
            "alert %d %s: %s [%s] %s",
            alert.id,
            alert.title,
            alert.summary or alert.key,
            alert.key,
            json.dumps(alert.payload.get("numbers", {}), default=str),
        )


def make_sink(config: SinkConfig) -> Sink:
    """The sink implementing ``config``."""
    if isinstance(config, WebhookSinkConfig):
        return WebhookSink(config)
    if isinstance(config, SlackSinkConfig):
        return SlackSink(config)
    if isinstance(config, EmailSinkConfig):
        return EmailSink(config)
    return LogSink(config)
