"""Errors that reach a user: each says what happened and what to do about it."""

from __future__ import annotations


class HeadraceError(Exception):
    """Base of every error headrace raises on purpose.

    ``what`` says what happened; ``fix`` says what the user can do. The CLI
    prints both and exits non-zero, without a traceback.
    """

    def __init__(self, what: str, fix: str = "") -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what}\n  what to do: {fix}" if fix else what)


class ConfigError(HeadraceError):
    """The configuration (file, settings, CLI flags) is wrong."""


class SourceError(HeadraceError):
    """The PostgreSQL source is not usable as configured."""


class ProtocolError(HeadraceError):
    """A replication message could not be decoded.

    Carries the LSN of the message and the byte offset inside it, so the
    offending WAL record can be found with ``pg_waldump``.
    """

    def __init__(self, what: str, *, lsn: int | None = None, offset: int | None = None) -> None:
        where = []
        if lsn is not None:
            where.append(f"at LSN {format_lsn(lsn)}")
        if offset is not None:
            where.append(f"byte {offset} of the message")
        suffix = f" ({', '.join(where)})" if where else ""
        self.lsn = lsn
        self.offset = offset
        super().__init__(
            f"malformed pgoutput message{suffix}: {what}",
            "this is a bug or an unsupported server version; report it with the "
            "server version and the LSN above",
        )


class StoreError(HeadraceError):
    """The analytical store refused or failed an operation."""


def format_lsn(lsn: int) -> str:
    """Render an LSN the way PostgreSQL does (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``XXX/XXX`` LSN notation into an integer."""
    try:
        high, low = text.strip().split("/")
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError as exc:
        raise ConfigError(
            f"not an LSN: {text!r}", "write it as PostgreSQL does, e.g. 0/16B3748"
        ) from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (driver errors carry several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
