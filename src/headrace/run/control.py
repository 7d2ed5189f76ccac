"""Files beside the store through which a running ``headrace run`` talks to other commands.

A running pipeline holds the DuckDB file (one writing process per file), so
``headrace status`` and ``headrace rebuild`` cannot open it. Instead:

- ``<store>.run.lock``: held (``flock``) by the running process for its whole
  life, released by the kernel even on ``kill -9``, so "is a run active?" has
  an exact answer; it also keeps a second ``headrace run`` off the store;
- ``<store>.status.json``: the runner's status, rewritten about once a second
  (write to a temporary file, then an atomic rename);
- ``<store>.control/``: requests (``rebuild``) as small JSON files the runner
  polls between batches, and its answers beside them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from headrace.errors import StoreError


@dataclass(frozen=True)
class RunFiles:
    """Where the side files of the store ``store`` live."""

    store: Path

    @property
    def status(self) -> Path:
        return self.store.with_name(self.store.name + ".status.json")

    @property
    def lock(self) -> Path:
        return self.store.with_name(self.store.name + ".run.lock")

    @property
    def control(self) -> Path:
        return self.store.with_name(self.store.name + ".control")


class RunLock:
    """The exclusive lock of a running pipeline on its store (see module docstring)."""

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreError` naming the process that holds it."""
        self.files.lock.parent.mkdir(parents=True, exist_ok=True)
        handle = self.files.lock.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(
                f"the store {self.files.store} is in use by headrace run (pid {holder})",
                "stop that process first, or point this run at another store",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def active_run(files: RunFiles) -> int | None:
    """PID of the ``headrace run`` holding the store, or None when none runs."""
    if not files.lock.exists():
        return None
    with files.lock.open("r") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Replace ``path`` with ``document`` so that a reader sees the old or the new file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, default=str, separators=(",", ":")))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when absent or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Request:
    """A request to the running pipeline (``kind`` ``rebuild``, with ``name``)."""

    id: str
    kind: str
    name: str
    path: Path


def submit_request(files: RunFiles, kind: str, name: str) -> Request:
    """Leave a request for the runner; it is picked up between batches."""
    files.control.mkdir(parents=True, exist_ok=True)
    request_id = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    path = files.control / f"{request_id}.request.json"
    write_json_atomic(path, {"id": request_id, "kind": kind, "name": name})
    return Request(request_id, kind, name, path)


def pending_requests(files: RunFiles) -> list[Request]:
    """Requests not yet answered, oldest first."""
    if not files.control.is_dir():
        return []
    out = []
    for path in sorted(files.control.glob("*.request.json")):
        document = read_json(path)
        if document is None:
            continue
        out.append(
            Request(
                str(document.get("id", path.name)),
                str(document.get("kind", "")),
                str(document.get("name", "")),
                path,
            )
        )
    return out


def answer_request(files: RunFiles, request: Request, *, ok: bool, message: str) -> None:
    """Record the outcome of ``request`` and remove it."""
    write_json_atomic(
        files.control / f"{request.id}.answer.json",
        {"id": request.id, "ok": ok, "message": message, "at": time.time()},
    )
    with contextlib.suppress(FileNotFoundError):
        request.path.unlink()


def wait_for_answer(files: RunFiles, request: Request, timeout_s: float) -> dict[str, Any] | None:
    """The runner's answer to ``request`` (removed once read), None after ``timeout_s``."""
    path = files.control / f"{request.id}.answer.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        document = read_json(path)
        if document is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return document
        time.sleep(0.1)
    return None
