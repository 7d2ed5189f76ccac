"""``bytea`` values from their text form: ``hex`` output vectorized, ``escape`` per value.

Apart from :mod:`.convert` because decoding hex digits over a whole column's
buffers is a piece of its own, with its own per-value fallback.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa

from headrace.source.postgres.convert_issues import note_issue
from headrace.source.postgres.convert_text import texts
from headrace.source.postgres.pgtypes import PgType

_HEX_VALUES: Final = np.full(256, 255, dtype=np.uint8)
for _digit, _char in enumerate(b"0123456789abcdef"):
    _HEX_VALUES[_char] = _digit
for _digit, _char in enumerate(b"ABCDEF", start=10):
    _HEX_VALUES[_char] = _digit


def bytea_column(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    """``\\x0a1b`` hex text to bytes, vectorized over the whole column."""
    binary = values.view(pa.binary())
    count = len(binary)
    if count == 0:
        return pa.array([], pa.binary())
    offsets = np.frombuffer(binary.buffers()[1], dtype=np.int32)[
        binary.offset : binary.offset + count + 1
    ].astype(np.int64)
    data_buffer = binary.buffers()[2]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, np.uint8)
    )
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    present = lengths > 0
    hex_form = bool(np.all(lengths[present] >= 2)) and bool(np.all(lengths[present] % 2 == 0))
    if hex_form and present.any():
        firsts = starts[present]
        hex_form = bool(np.all(data[firsts] == ord("\\")) and np.all(data[firsts + 1] == ord("x")))
    if not hex_form:
        return _bytea_per_value(values, pg_type)
    keep = np.ones(int(offsets[-1] - offsets[0]), dtype=bool)
    keep[starts[present] - offsets[0]] = False
    keep[starts[present] - offsets[0] + 1] = False
    digits = _HEX_VALUES[data[offsets[0] : offsets[-1]][keep]]
    if digits.size and digits.max() == 255:
        return _bytea_per_value(values, pg_type)
    decoded = (digits[0::2] << 4) | digits[1::2]
    new_lengths = np.where(present, (lengths - 2) // 2, 0)
    new_offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(new_lengths, out=new_offsets[1:])
    validity = binary.buffers()[0]
    if binary.offset and validity is not None:
        validity = _validity_bitmap(binary)
    return pa.Array.from_buffers(
        pa.binary(),
        count,
        [validity, pa.py_buffer(new_offsets), pa.py_buffer(decoded.astype(np.uint8))],
        null_count=binary.null_count,
    )


def _validity_bitmap(array: pa.Array) -> pa.Buffer:
    valid = np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _bytea_per_value(values: pa.Array, pg_type: PgType) -> pa.Array:
    out: list[bytes | None] = []
    bad = 0
    for text in texts(values):
        if text is None:
            out.append(None)
            continue
        value = parsebytea_column(text)
        if value is None:
            bad += 1
        out.append(value)
    if bad:
        note_issue(pg_type.name, "bytea text that does not parse", bad)
    return pa.array(out, type=pa.binary())


def parsebytea_column(text: str) -> bytes | None:
    """One bytea value in ``hex`` or ``escape`` output form."""
    if text.startswith("\\x"):
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            return None
    out = bytearray()
    position = 0
    while position < len(text):
        char = text[position]
        if char != "\\":
            out.extend(char.encode("latin-1", errors="strict"))
            position += 1
        elif text[position + 1 : position + 2] == "\\":
            out.append(0x5C)
            position += 2
        else:
            octal = text[position + 1 : position + 4]
            if len(octal) != 3 or not all(c in "01234567" for c in octal):
                return None
            out.append(int(octal, 8))
            position += 4
    return bytes(out)
