"""The ``headrace`` command's entry point: the allocator first, then the command line.

Kept apart from :mod:`headrace.cli.main` because choosing the allocator may
execute the process again (:mod:`headrace.run.preload`), and that must happen
before the command line's imports (DuckDB, pyarrow, the web stack: ~1 s) are
paid for.
"""

from __future__ import annotations

from headrace.run.preload import preload_jemalloc


def main() -> None:
    """Run the ``headrace`` command line, on jemalloc when the machine has it."""
    preload_jemalloc()
    from headrace.cli.main import app  # noqa: PLC0415 - after the allocator is chosen

    app()
