"""Fixtures of the run-loop tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import PgDatabase
from tests.run.pipeline import STARTED


@pytest.fixture(autouse=True)
def kill_leftovers(pg_db: PgDatabase) -> Iterator[None]:
    """A failed test must not leave a ``headrace run`` process behind (ended before its
    database is dropped: every test here uses ``pg_db``)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(10)
