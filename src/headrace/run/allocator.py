"""The allocator Arrow uses while headrace runs: the C library's, unless the user chose one.

pyarrow's default pool (mimalloc, as pyarrow 26 ships it) gives freed memory
back to the kernel within milliseconds and faults it in again for the next
batch, zeroing 2 MB huge pages each time: under ``perf`` at 100,000 changes/s,
page faults were 6.6% of ``headrace run``'s CPU. With the C library's
allocator large batches apply faster, the snapshot into the store is faster
and the run's peak RSS is lower; the fintech deployment's small batches are
unchanged (measured in docs/latency.md, nineteenth session).

``ARROW_DEFAULT_MEMORY_POOL`` (``system``, ``jemalloc`` or ``mimalloc``, read
by Arrow itself) still decides when it is set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pyarrow as pa

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


@contextlib.contextmanager
def arrow_allocator() -> Iterator[str]:
    """Within the block, Arrow allocates with the C library's allocator unless
    :data:`POOL_ENV` names a pool; yields the backend in use. The previous default
    pool is restored afterwards (buffers keep the pool they came from)."""
    previous = pa.default_memory_pool()
    if not os.environ.get(POOL_ENV):
        pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield pa.default_memory_pool().backend_name
    finally:
        pa.set_memory_pool(previous)
