"""Fixtures of the rules' tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PgDatabase


@pytest.fixture
def fresh(pg_db: PgDatabase, tmp_path: Path) -> tuple[PgDatabase, Path]:
    """The database and a directory, for hypothesis tests (which reset them per example:
    function-scoped fixtures are set up once per test, not per example)."""
    return pg_db, tmp_path
