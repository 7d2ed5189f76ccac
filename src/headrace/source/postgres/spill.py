"""Raw row messages of a large transaction, buffered in a file while it arrives.

A transaction is handed on only once it commits, so its row messages wait in
the batcher until then: about 200 bytes a change in memory (the message and
its LSN), 200 MB for a 1M-row ``UPDATE``, with no bound. Once a transaction
holds more than a piece's worth in memory (``piece_changes``), the source moves
them into a file of that transaction's own (:class:`SpillFile`): unlinked as
soon as it is created, so it disappears with the transaction, or with the
process if it dies; read back a piece at a time when the batch is decoded
(:mod:`.pieces`). Writes happen on the source thread before the commit,
reads after it, from any thread (``os.pread``).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from headrace.errors import SourceError

Int64Array = npt.NDArray[np.int64]


class SpillFile:
    """An unlinked temporary file holding row messages, appended to and read by offset."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        try:
            # Open for the transaction's life, closed (and so gone) with it: no `with`.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="headrace-spill-", dir=directory
            )
        except OSError as exc:
            raise _spill_error(directory, exc) from exc
        # The last holder of its rows (a batch, an aborted stream) drops it: closed then.
        self._close = weakref.finalize(self, self._file.close)
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, payloads: list[bytes | memoryview], lsns: list[int]) -> SpilledRows:
        """Append row messages (and their LSNs, kept in memory as an array)."""
        lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
        data = b"".join(payloads)
        offset = self._size
        try:
            written = 0
            view = memoryview(data)
            while written < len(data):
                written += os.pwrite(self._file.fileno(), view[written:], offset + written)
        except OSError as exc:
            raise _spill_error(self.directory, exc) from exc
        self._size += len(data)
        return SpilledRows(self, offset, lengths, np.asarray(lsns, dtype=np.int64))

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``."""
        parts = []
        done = 0
        while done < size:
            part = os.pread(self._file.fileno(), size - done, offset + done)
            if not part:
                raise SourceError(
                    f"the spill file of a large transaction ended early ({done} of {size} bytes)",
                    "this is a bug in headrace: report it; a restart reads the transaction "
                    "again from the slot",
                )
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._close()


def _spill_error(directory: Path | None, exc: OSError) -> SourceError:
    where = directory if directory is not None else Path(tempfile.gettempdir())
    return SourceError(
        f"cannot buffer a large transaction's changes on disk in {where}: {exc.strerror or exc}",
        "free space there (the transaction is read again from the slot after a restart: "
        "nothing is lost), or raise --piece-changes to keep more of it in memory",
    )


@dataclass(frozen=True)
class SpilledRows:
    """Consecutive row messages in a :class:`SpillFile`: where, how long each, their LSNs."""

    file: SpillFile
    offset: int
    lengths: Int64Array
    lsns: Int64Array

    def __len__(self) -> int:
        return len(self.lengths)

    def part(self, start: int, end: int) -> SpilledRows:
        """Rows ``start:end`` (no reading)."""
        skipped = int(self.lengths[:start].sum())
        return SpilledRows(
            self.file, self.offset + skipped, self.lengths[start:end], self.lsns[start:end]
        )

    def read(self) -> tuple[list[bytes | memoryview], list[int]]:
        """The messages (views into one read) and their LSNs."""
        data = memoryview(self.file.read(self.offset, int(self.lengths.sum())))
        ends = np.cumsum(self.lengths).tolist()
        starts = [0, *ends[:-1]]
        payloads: list[bytes | memoryview] = [data[s:e] for s, e in zip(starts, ends, strict=True)]
        return payloads, self.lsns.tolist()
