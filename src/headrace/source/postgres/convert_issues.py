"""Counting (and logging once) the values a conversion could not keep exactly.

:data:`conversion_issues` is shared by every converter (text, binary, the
snapshot's binary COPY), so it lives apart from any of them; a consumer that
decodes a batch's pieces again turns the counting off with
:func:`conversions_not_counted`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator

# Logged under the name of the converters (:mod:`.convert`), whose conversions these are.
log = logging.getLogger("headrace.source.postgres.convert")

conversion_issues: Counter[tuple[str, str]] = Counter()
"""Values converted lossily, by (type name, issue), since the process started."""

_logged_issues: set[tuple[str, str]] = set()

_issues_lock = threading.Lock()
_not_counting = threading.local()


@contextlib.contextmanager
def conversions_not_counted() -> Iterator[None]:
    """Decode without counting lossy conversions (on this thread): for a consumer that
    decodes a batch's pieces again (the rules lane, the recorder), whose values the
    writer's decoding already counted."""
    _not_counting.on = True
    try:
        yield
    finally:
        _not_counting.on = False


def conversion_issue_counts() -> dict[tuple[str, str], int]:
    """A copy of :data:`conversion_issues` (taken under its lock)."""
    with _issues_lock:
        return dict(conversion_issues)


def _count(type_name: str, issue: str, count: int, message: str) -> None:
    if getattr(_not_counting, "on", False):
        return
    key = (type_name, issue)
    with _issues_lock:  # the decoding runs on the source thread and the writer's
        conversion_issues[key] += count
        first = key not in _logged_issues
        _logged_issues.add(key)
    if first:
        log.warning(message, *key)


def note_issue(type_name: str, issue: str, count: int = 1) -> None:
    """Count ``count`` values that could not be kept (stored as NULL) and log each
    (type, issue) pair once."""
    _count(type_name, issue, count, "type %s: %s (stored as NULL; counted in conversion_issues)")


def note_kept(type_name: str, issue: str, count: int) -> None:
    """Count ``count`` values kept in another shape than PostgreSQL's (an array
    flattened, say) and log each (type, issue) pair once."""
    _count(type_name, issue, count, "type %s: %s")
