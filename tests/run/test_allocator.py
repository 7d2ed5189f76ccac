"""Arrow's allocator while headrace runs: the C library's, unless the user chose a pool."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa

from headrace.run.allocator import POOL_ENV, arrow_allocator

_PROBE = """
import pyarrow as pa
from headrace.run.allocator import arrow_allocator
before = pa.default_memory_pool().backend_name
with arrow_allocator() as inside:
    assert pa.array(range(1000)).sum().as_py() == 499500
print(before, inside, pa.default_memory_pool().backend_name)
"""


def _probe(pool: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != POOL_ENV}
    if pool is not None:
        env[POOL_ENV] = pool
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_the_c_library_allocator_while_running_then_the_previous_pool() -> None:
    before, inside, after = _probe(None)
    assert inside == "system"
    assert after == before


def test_a_pool_the_user_chose_is_kept() -> None:
    assert _probe("jemalloc") == ["jemalloc", "jemalloc", "jemalloc"]


def test_buffers_outlive_the_block() -> None:
    with arrow_allocator():
        values = pa.array(list(range(100_000)), type=pa.int64())
    assert values.sum().as_py() == sum(range(100_000))
