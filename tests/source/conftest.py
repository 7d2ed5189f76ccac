"""Fixtures shared by the change-source tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from headrace.sandbox.postgres import ThrowawayPostgres


@pytest.fixture(scope="session")
def two_phase_cluster() -> Iterator[ThrowawayPostgres]:
    """A cluster that allows prepared transactions (a restart-only setting), shared by
    every test that needs one."""
    cluster = ThrowawayPostgres(settings={"max_prepared_transactions": "10"})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
