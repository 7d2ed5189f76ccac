"""Binary send forms (pgoutput's ``binary`` option) into Arrow, for the
fixed-width types and a few whose binary form is their text (text, enum, json,
bytea, uuid). Other types raise a clear error: text format is what headrace
asks for, and what it decodes fastest.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from headrace.errors import SourceError
from headrace.source.postgres.pgtypes import DATE_INFINITY, TIMESTAMP_INFINITY, PgType, TypeKind

_DAYS_1970_TO_2000: Final = 10957
_PG_EPOCH_US: Final = 946_684_800_000_000


_BINARY_FIXED: Final[dict[TypeKind, np.dtype[Any]]] = {
    TypeKind.BOOL: np.dtype("u1"),
    TypeKind.INT2: np.dtype(">i2"),
    TypeKind.INT4: np.dtype(">i4"),
    TypeKind.INT8: np.dtype(">i8"),
    TypeKind.FLOAT4: np.dtype(">f4"),
    TypeKind.FLOAT8: np.dtype(">f8"),
    TypeKind.DATE: np.dtype(">i4"),
    TypeKind.TIME: np.dtype(">i8"),
    TypeKind.TIMESTAMP: np.dtype(">i8"),
    TypeKind.TIMESTAMPTZ: np.dtype(">i8"),
}


def binary_column_to_arrow(values: pa.Array, arrow_type: pa.DataType, pg_type: PgType) -> pa.Array:
    """Binary send form (pgoutput ``binary`` option) for fixed-width types."""
    kind = pg_type.kind
    binary = values.view(pa.binary())
    if kind in (TypeKind.TEXT, TypeKind.ENUM, TypeKind.JSON) and pg_type.name != "jsonb":
        try:
            return binary.cast(pa.string())
        except pa.ArrowInvalid as exc:
            raise SourceError(
                f"a {pg_type.name} value is not valid UTF-8: {exc}",
                "connect with client_encoding=UTF8 (headrace's connections do)",
            ) from exc
    if kind is TypeKind.BYTEA:
        return binary
    if kind is TypeKind.UUID:
        texts = [None if raw is None else _uuid_text(raw) for raw in binary.to_pylist()]
        return pa.array(texts, pa.string())
    dtype = _BINARY_FIXED.get(kind)
    if dtype is None:
        raise SourceError(
            f"binary-format values of type {pg_type.name} are not supported",
            "drop the pgoutput 'binary' option: headrace decodes text format fastest",
        )
    valid = np.asarray(binary.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    lengths = np.asarray(pc.binary_length(binary).fill_null(0).to_numpy(), dtype=np.int64)
    if np.any(lengths[valid] != dtype.itemsize):
        raise SourceError(
            f"a binary {pg_type.name} value is not {dtype.itemsize} bytes long",
            "report this with the server version",
        )
    raw = b"".join(item for item in binary.to_pylist() if item is not None)
    parsed = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    if kind is TypeKind.DATE:
        parsed = _shift_finite(parsed.astype(np.int64), _DAYS_1970_TO_2000, DATE_INFINITY)
    elif kind in (TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ):
        parsed = _shift_finite(parsed, _PG_EPOCH_US, TIMESTAMP_INFINITY)
    full = np.zeros(len(binary), dtype=_storage_numpy(kind))
    full[valid] = parsed
    mask = None if valid.all() else ~valid
    storage = pa.array(full, mask=mask)
    if kind is TypeKind.BOOL:
        return storage.cast(pa.bool_())
    return storage.view(arrow_type) if storage.type != arrow_type else storage


def _shift_finite(
    values: npt.NDArray[np.int64], shift: int, infinity: int
) -> npt.NDArray[np.int64]:
    """Move PostgreSQL-epoch values to the Unix epoch, keeping the infinities."""
    int64_max = np.iinfo(np.int64).max
    pos_inf = values == (int64_max if infinity == TIMESTAMP_INFINITY else 2**31 - 1)
    neg_inf = values == (np.iinfo(np.int64).min if infinity == TIMESTAMP_INFINITY else -(2**31))
    shifted = np.where(pos_inf | neg_inf, 0, values) + shift
    shifted[pos_inf] = infinity
    shifted[neg_inf] = -infinity
    return shifted


def _storage_numpy(kind: TypeKind) -> np.dtype[Any]:
    return _STORAGE_NUMPY.get(kind, np.dtype("i8"))


_STORAGE_NUMPY: Final[dict[TypeKind, np.dtype[Any]]] = {
    TypeKind.BOOL: np.dtype("u1"),
    TypeKind.INT2: np.dtype("i2"),
    TypeKind.INT4: np.dtype("i4"),
    TypeKind.FLOAT4: np.dtype("f4"),
    TypeKind.FLOAT8: np.dtype("f8"),
    TypeKind.DATE: np.dtype("i4"),
}


def _uuid_text(raw: bytes) -> str:
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
