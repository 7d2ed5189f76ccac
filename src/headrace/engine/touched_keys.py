"""A batch's touched keys: every key a change removed or wrote, with its last touch.

Each change touches up to two keys: the old one it modifies or removes (updates,
deletes) and the new one it writes (inserts, updates). A touch is numbered
``seq * 2 + side`` (side 0 old, 1 new), so a key's largest number says which change
touched it last and whether that change left a row under it (odd: the key's end
row). :mod:`headrace.engine.batch_changes` feeds the sides from a batch's Arrow
columns; the result is the ``_hr_k_i`` table of :mod:`headrace.engine.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

LAST = "_hr_last"
"""The column of a key's last touch (``seq * 2 + side``)."""


@dataclass(frozen=True)
class KeySide:
    """One side of a batch's changes: per change, its key on this side and whether the
    change touches it (``keep``; NULL counts as no)."""

    side: int
    """0 for the old keys (modified or removed), 1 for the new ones (written)."""
    keys: list[pa.ChunkedArray]
    keep: pa.Array | pa.ChunkedArray


def last_touches(names: list[str], seqs: pa.ChunkedArray, sides: list[KeySide]) -> pa.Table:
    """Each touched key (columns ``names``) with its last touch (:data:`LAST`).

    A single integer key is grouped by sorting in numpy, anything else by Arrow's
    hash group-by: with a large batch's mostly distinct keys the hash table is the
    slow case (185,000 changes touching 169,000 keys: 13-35 ms grouped, 10-15 ms
    sorted, measured on `bench pipeline --rate 100000`'s batches)."""
    if len(names) == 1 and all(pa.types.is_integer(s.keys[0].type) for s in sides):
        return sorted_last_touches(names[0], seqs, sides)
    return grouped_last_touches(names, seqs, sides)


def grouped_last_touches(names: list[str], seqs: pa.ChunkedArray, sides: list[KeySide]) -> pa.Table:
    """:func:`last_touches` by Arrow's hash group-by (any key types)."""
    parts = []
    for side in sides:
        last = pc.add(pc.multiply(seqs, 2), side.side)
        part = pa.table([*side.keys, last], [*names, LAST])
        parts.append(part.filter(pc.fill_null(side.keep, False)))
    # On this thread: Acero's thread pool costs more than it saves at batch sizes
    # (2.1 against 3.7 ms for a 41,000-change batch).
    grouped = pa.concat_tables(parts).group_by(names, use_threads=False).aggregate([(LAST, "max")])
    return pa.table([*(grouped[name] for name in names), grouped[f"{LAST}_max"]], [*names, LAST])


def sorted_last_touches(name: str, seqs: pa.ChunkedArray, sides: list[KeySide]) -> pa.Table:
    """:func:`last_touches` for one integer key column, by sorting in numpy."""
    if not sides:
        return pa.table([pa.array([], pa.int64()), pa.array([], pa.int64())], [name, LAST])
    seq = seqs.to_numpy()
    keys, lasts = [], []
    for side in sides:
        kept = pc.fill_null(side.keep, False).to_numpy(zero_copy_only=False)
        # NULLs filled first, so that the column converts as integers, not floats.
        keys.append(pc.fill_null(side.keys[0], 0).to_numpy()[kept])
        lasts.append(seq[kept] * 2 + side.side)
    key_type = sides[0].keys[0].type
    all_keys, all_lasts = np.concatenate(keys), np.concatenate(lasts)
    packed = _packed_last_touches(all_keys, all_lasts)
    if packed is not None:
        sorted_keys, sorted_lasts = packed
    else:
        order = np.argsort(all_keys)
        sorted_keys, sorted_lasts = all_keys[order], all_lasts[order]
        if len(sorted_keys):
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            sorted_keys = sorted_keys[starts]
            sorted_lasts = np.maximum.reduceat(sorted_lasts, starts)
    return pa.table(
        [pa.array(sorted_keys, type=key_type), pa.array(sorted_lasts, type=pa.int64())],
        [name, LAST],
    )


_INT64_BITS = 63
"""Value bits of an int64: a packed key and touch must stay non-negative."""


def _packed_last_touches(
    keys: npt.NDArray[np.integer[Any]], lasts: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.integer[Any]], npt.NDArray[np.int64]] | None:
    """Each distinct key of ``keys`` (ascending) with its largest touch, by sorting the
    pairs packed into one int64 each (``(key - smallest) << bits | touch``), or None when
    they do not fit (keys spread over more than ``63 - bits`` bits).

    Sorting values is about twice as fast as ``argsort`` and the gathers after it
    (a 133,000-change batch's 185,000 touches: 4.5 against 10.7 ms), and within a
    key the largest touch sorts last, so no ``reduceat`` is needed either."""
    if not len(keys):
        return keys, lasts
    smallest, largest = int(keys.min()), int(keys.max())
    if int(lasts.min()) < 0 or largest >= 1 << _INT64_BITS:
        return None
    bits = max(int(lasts.max()).bit_length(), 1)
    if (largest - smallest).bit_length() + bits > _INT64_BITS:
        return None
    packed = (keys.astype(np.int64) - smallest) << bits  # spread < 2**(63 - bits): no overflow
    packed |= lasts
    packed.sort()
    spread = packed >> bits
    ends = np.flatnonzero(np.r_[spread[1:] != spread[:-1], True])
    distinct = (spread[ends] + smallest).astype(keys.dtype)
    return distinct, packed[ends] & ((1 << bits) - 1)
