"""headrace's processes on jemalloc instead of the C library's malloc, when the machine has it.

Why: a batch of a few thousand changes is a dozen DuckDB statements, and
planning each one allocates and frees hundreds of thousands of small objects
(parse trees, bound expressions, plans) through ``operator new``, which DuckDB
leaves to the C library. glibc's malloc spent ~12% of ``bench replay``'s CPU
(``_int_malloc``, ``_int_free``, ``malloc_consolidate``) on a 10,000 changes/s
recording; with jemalloc preloaded the same replay applied its batches 4-15%
faster on 7-15% less CPU, and live at 10,000 changes/s freshness p99 was
232-306 against 288-380 ms (7 alternating pairs); at 100,000 changes/s the
difference is within the machine's noise (docs/latency.md, thirtieth session).

How: the allocator of a process is chosen when it starts (``LD_PRELOAD``), so
:func:`preload_jemalloc`, called first thing by the ``headrace`` command,
executes the same command again with jemalloc preloaded: same PID, same
arguments, same descriptors, ~50 ms. The new process takes ``LD_PRELOAD`` back
out of its environment, so what it starts in turn (PostgreSQL in the sandbox,
the benchmarks' generators) keeps the C library's allocator.

``HEADRACE_MALLOC`` decides: unset or ``auto`` (jemalloc when found, else the C
library's, silently), ``system`` (never), or the path of a shared library to
preload instead. On other systems than Linux nothing happens.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

MALLOC_ENV = "HEADRACE_MALLOC"
"""``auto`` (default), ``system``, or the path of an allocator library to preload."""
_REEXEC_ENV = "_HEADRACE_PRELOAD_WAS"
"""Set for the re-executed process: the ``LD_PRELOAD`` it had before (may be empty)."""
_PRELOAD_ENV = "LD_PRELOAD"
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
"""Allocator libraries recognised in ``LD_PRELOAD`` and in a process's mappings."""

JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
"""Where Debian's ``libjemalloc2`` (and other distributions' packages) put the library."""


def find_jemalloc() -> str | None:
    """The first jemalloc shared library of :data:`JEMALLOC_PATHS` that exists."""
    return next((path for path in JEMALLOC_PATHS if Path(path).is_file()), None)


def wanted_library(environ: Mapping[str, str]) -> str | None:
    """The library to preload as :data:`MALLOC_ENV` asks, or None for the C library's."""
    choice = environ.get(MALLOC_ENV, "auto").strip() or "auto"
    if choice == "system":
        return None
    if choice == "auto":
        return find_jemalloc()
    if not Path(choice).is_file():
        print(
            f"headrace: {MALLOC_ENV}={choice}: no such file; running on the C library's "
            "allocator (set it to auto, system, or an allocator library's path)",
            file=sys.stderr,
        )
        return None
    return choice


def preload_jemalloc() -> None:
    """Execute this process again with the allocator :data:`MALLOC_ENV` asks for preloaded
    (see the module's docstring); in the re-executed process, restore ``LD_PRELOAD``.

    Returns without doing anything when ``LD_PRELOAD`` already names an allocator
    (the user's choice stays theirs), when none is wanted or found, or off Linux."""
    environ = os.environ
    if _REEXEC_ENV in environ:
        _restore_preload(environ.pop(_REEXEC_ENV))
        return
    if not sys.platform.startswith("linux"):
        return
    library = wanted_library(environ)
    preloaded = environ.get(_PRELOAD_ENV, "")
    if library is None or library in preloaded.split():
        return
    if any(f"lib{name}" in preloaded for name in ALLOCATORS):
        return  # the user preloaded an allocator of their own
    argv = list(getattr(sys, "orig_argv", ()))
    if not argv or not sys.executable:
        return
    environ[_REEXEC_ENV] = preloaded
    environ[_PRELOAD_ENV] = f"{library} {preloaded}".strip()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)  # noqa: S606 - the same interpreter and arguments
    except OSError:  # could not execute again: carry on as we are
        environ.pop(_REEXEC_ENV, None)
        _restore_preload(preloaded)


def _restore_preload(previous: str) -> None:
    """Put ``LD_PRELOAD`` back as it was before :func:`preload_jemalloc` (unset when empty)."""
    if previous:
        os.environ[_PRELOAD_ENV] = previous
    else:
        os.environ.pop(_PRELOAD_ENV, None)


def allocator_in_use(pid: int | str = "self") -> str:
    """``jemalloc``, ``tcmalloc``, ``mimalloc`` when the process maps that library (DuckDB's
    and Arrow's private copies excepted), else ``system``."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    for name in ALLOCATORS:
        if f"lib{name}" in maps:
            return name
    return "system"
