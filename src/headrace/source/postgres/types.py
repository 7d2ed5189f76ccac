"""PostgreSQL types to Arrow: the registry of known types and the type mapping.

=====================================  =========================================
PostgreSQL                             Arrow
=====================================  =========================================
int2 / int4 / int8 (oid, xid: int8)    int16 / int32 / int64
numeric(p, s)                          decimal128(p, s); decimal256 when p > 38;
                                       string when p > 76 or s < 0 or s > p
numeric (no precision)                 string: the exact text (NaN, Infinity kept)
float4 / float8                        float32 / float64 (NaN, ±Infinity, -0)
bool                                   bool
text, varchar, bpchar, name, "char"    string
uuid                                   string (canonical text)
date                                   date32
time                                   time64[us]
timestamp                              timestamp[us]
timestamptz                            timestamp[us, tz=UTC]
interval                               month_day_nano_interval
json, jsonb                            string (JSON text)
bytea                                  binary
enum                                   string (the label)
domain                                 its base type (the domain's typmod applies)
array of T                             list<T>
other built-ins (inet, money, ...)     string (their text form)
composite, unknown                     string (their text form), one warning per type
=====================================  =========================================

Value conversion lives in :mod:`headrace.source.postgres.convert`;
:func:`text_column_to_arrow` is its entry point, re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
import pyarrow as pa

from headrace.source.changes import Column
from headrace.source.postgres.connect_errors import connect_sql
from headrace.source.postgres.convert import convert_column
from headrace.source.postgres.pgtypes import (
    BOX_OID,
    FIRST_NON_BUILTIN_OID,
    PgType,
    TypeKind,
    builtin_type,
)

__all__ = [
    "PgType",
    "TypeKind",
    "TypeRegistry",
    "arrow_type_for",
    "arrow_type_of",
    "text_column_to_arrow",
]

log = logging.getLogger(__name__)

_VARHDRSZ: Final = 4

# pg_type.typtype of user types that are neither domains nor arrays.
_KIND_OF_TYPTYPE: Final = {
    "e": TypeKind.ENUM,
    "c": TypeKind.COMPOSITE,
    "r": TypeKind.TEXTUAL,  # range
    "m": TypeKind.TEXTUAL,  # multirange
}

_CATALOG_QUERY: Final = """
SELECT t.oid::int8, n.nspname, t.typname, t.typtype, t.typelem::int8, t.typbasetype::int8,
       t.typtypmod, t.typdelim,
       (t.typcategory = 'A' AND t.typlen = -1 AND t.typelem <> 0) AS is_array
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
"""


@dataclass(frozen=True)
class _CatalogRow:
    oid: int
    namespace: str
    name: str
    typtype: str
    element_oid: int
    base_oid: int
    base_modifier: int
    delimiter: str
    is_array: bool

    @property
    def qualified(self) -> str:
        if self.namespace in ("pg_catalog", "public"):
            return self.name
        return f"{self.namespace}.{self.name}"


class TypeRegistry:
    """Every type the source may meet: built-ins, plus user types loaded from
    ``pg_catalog`` (enums, domains, arrays, composites, extension types).

    ``catalog_dsn``, when given, is used to load a user type the registry has
    not seen yet (e.g. created after the source started) the first time it is
    looked up. Without it such a type is converted as text, with a warning.
    """

    def __init__(self, catalog_dsn: str | None = None) -> None:
        self.catalog_dsn = catalog_dsn
        self._rows: dict[int, _CatalogRow] = {}
        self._resolved: dict[int, PgType] = {}
        self._message_names: dict[int, str] = {}
        self._warned: set[int] = set()
        self._failed_lookups: set[int] = set()

    @classmethod
    def load(cls, conn: psycopg.Connection[Any], *, catalog_dsn: str | None = None) -> TypeRegistry:
        """A registry holding every user type of ``conn``'s database."""
        registry = cls(catalog_dsn=catalog_dsn)
        registry.load_catalog(conn)
        return registry

    # ------------------------------------------------------------ loading

    def load_catalog(self, conn: psycopg.Connection[Any], oids: Iterable[int] | None = None) -> int:
        """Load user types (all, or the given OIDs and what they refer to)
        from ``pg_catalog`` over a normal connection. Returns how many rows
        were read."""
        loaded = 0
        if oids is None:
            rows = conn.execute(_CATALOG_QUERY + " WHERE t.oid >= %s", (FIRST_NON_BUILTIN_OID,))
            loaded += self._add_rows(rows.fetchall())
            wanted = self._missing_references()
        else:
            wanted = {oid for oid in oids if oid not in self._rows and builtin_type(oid) is None}
        while wanted:
            rows = conn.execute(_CATALOG_QUERY + " WHERE t.oid = ANY(%s)", (sorted(wanted),))
            fetched = rows.fetchall()
            loaded += self._add_rows(fetched)
            self._failed_lookups.update(wanted - {int(row[0]) for row in fetched})
            wanted = self._missing_references()
        self._resolved.clear()
        return loaded

    def load_catalog_from_dsn(self, dsn: str, oids: Iterable[int] | None = None) -> int:
        """:meth:`load_catalog` over a new short-lived connection."""
        with connect_sql(dsn, autocommit=True) as conn:
            return self.load_catalog(conn, oids)

    def _add_rows(self, rows: list[tuple[Any, ...]]) -> int:
        for row in rows:
            entry = _CatalogRow(
                oid=int(row[0]),
                namespace=str(row[1]),
                name=str(row[2]),
                typtype=str(row[3]),
                element_oid=int(row[4]),
                base_oid=int(row[5]),
                base_modifier=int(row[6]),
                delimiter=str(row[7]),
                is_array=bool(row[8]),
            )
            self._rows[entry.oid] = entry
        return len(rows)

    def _missing_references(self) -> set[int]:
        missing: set[int] = set()
        for row in self._rows.values():
            for ref in (row.element_oid, row.base_oid):
                if (
                    ref
                    and ref not in self._rows
                    and ref not in self._failed_lookups
                    and builtin_type(ref) is None
                ):
                    missing.add(ref)
        return missing

    def note_type_message(self, oid: int, namespace: str, name: str) -> None:
        """Record a pgoutput Type message (it names a user type about to be used)."""
        self._message_names[oid] = (
            name if namespace in ("pg_catalog", "public") else (f"{namespace}.{name}")
        )
        if oid not in self._rows and self.catalog_dsn is not None:
            self._load_lazily(oid)

    def _load_lazily(self, oid: int) -> None:
        if oid in self._failed_lookups or self.catalog_dsn is None:
            return
        try:
            self.load_catalog_from_dsn(self.catalog_dsn, [oid])
        except psycopg.Error as exc:
            log.warning("could not load type %d from the catalog: %s", oid, exc)
            self._failed_lookups.add(oid)

    # ------------------------------------------------------------ lookup

    def lookup(self, oid: int) -> PgType:
        """The type with this OID; an UNKNOWN type when nothing is known of it."""
        resolved = self._resolved.get(oid)
        if resolved is not None:
            return resolved
        builtin = builtin_type(oid)
        if builtin is not None:
            self._resolved[oid] = builtin
            return builtin
        if oid not in self._rows and oid >= FIRST_NON_BUILTIN_OID:
            self._load_lazily(oid)
        resolved = self._resolve(oid, depth=0)
        self._resolved[oid] = resolved
        return resolved

    def _resolve(self, oid: int, depth: int) -> PgType:
        builtin = builtin_type(oid)
        if builtin is not None:
            return builtin
        row = self._rows.get(oid)
        if row is None or depth > 32:
            name = self._message_names.get(oid, f"oid {oid}")
            return PgType(oid, name, TypeKind.UNKNOWN)
        name = row.qualified
        if row.typtype == "d":
            base = self._resolve(row.base_oid, depth + 1)
            modifier = row.base_modifier if row.base_modifier != -1 else base.base_modifier
            return PgType(oid, name, base.kind, base.element, modifier, base.delimiter)
        if row.is_array:
            element = self._resolve(row.element_oid, depth + 1)
            element_row = self._rows.get(row.element_oid)
            if element_row is not None:
                delimiter = element_row.delimiter
            else:
                delimiter = ";" if row.element_oid == BOX_OID else ","
            return PgType(oid, name, TypeKind.ARRAY, element, delimiter=delimiter)
        return PgType(oid, name, _KIND_OF_TYPTYPE.get(row.typtype, TypeKind.UNKNOWN))

    def arrow_type(self, type_oid: int, type_modifier: int) -> pa.DataType:
        """Shorthand for :func:`arrow_type_for` with this registry."""
        return arrow_type_for(type_oid, type_modifier, self)

    def convert(self, values: pa.Array, column: Column, *, binary: bool = False) -> pa.Array:
        """Convert a column of raw values of ``column`` (see :func:`text_column_to_arrow`)."""
        return convert_column(
            values, column.arrow_type, self.lookup(column.type_oid), binary=binary
        )

    def warn_once(self, pg_type: PgType) -> None:
        """Log, once per type, that values of ``pg_type`` are kept as text."""
        if pg_type.oid in self._warned:
            return
        self._warned.add(pg_type.oid)
        what = "a composite type" if pg_type.kind is TypeKind.COMPOSITE else "an unknown type"
        log.warning(
            "type %s (oid %d) is %s: its values are kept as their text form",
            pg_type.name,
            pg_type.oid,
            what,
        )


def numeric_precision_scale(modifier: int) -> tuple[int, int] | None:
    """(precision, scale) of a numeric type modifier; ``None`` when unconstrained."""
    if modifier < _VARHDRSZ:
        return None
    value = modifier - _VARHDRSZ
    precision = (value >> 16) & 0xFFFF
    scale = ((value & 0x7FF) ^ 1024) - 1024  # an 11-bit signed scale since PostgreSQL 15
    return precision, scale


_SIMPLE_ARROW: Final[dict[TypeKind, pa.DataType]] = {
    TypeKind.BOOL: pa.bool_(),
    TypeKind.INT2: pa.int16(),
    TypeKind.INT4: pa.int32(),
    TypeKind.INT8: pa.int64(),
    TypeKind.FLOAT4: pa.float32(),
    TypeKind.FLOAT8: pa.float64(),
    TypeKind.DATE: pa.date32(),
    TypeKind.TIME: pa.time64("us"),
    TypeKind.TIMESTAMP: pa.timestamp("us"),
    TypeKind.TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
    TypeKind.INTERVAL: pa.month_day_nano_interval(),
    TypeKind.BYTEA: pa.binary(),
}


def arrow_type_of(pg_type: PgType, type_modifier: int = -1) -> pa.DataType:
    """The Arrow type of a column of ``pg_type`` with this type modifier."""
    kind = pg_type.kind
    simple = _SIMPLE_ARROW.get(kind)
    if simple is not None:
        return simple
    modifier = pg_type.modifier(type_modifier)
    if kind is TypeKind.NUMERIC:
        constrained = numeric_precision_scale(modifier)
        if constrained is not None:
            precision, scale = constrained
            if 0 <= scale <= precision and 0 < precision <= 38:
                return pa.decimal128(precision, scale)
            if 0 <= scale <= precision <= 76:
                return pa.decimal256(precision, scale)
        return pa.string()
    if kind is TypeKind.ARRAY:
        if pg_type.element is None:  # pragma: no cover - the registry always sets it
            raise TypeError(f"array type {pg_type.name} without an element type")
        return pa.list_(arrow_type_of(pg_type.element, modifier))
    return pa.string()


def arrow_type_for(type_oid: int, type_modifier: int, registry: TypeRegistry) -> pa.DataType:
    """The Arrow type of a column of type ``type_oid`` (unknown types: string,
    with one warning per type)."""
    pg_type = registry.lookup(type_oid)
    shown = pg_type.element if pg_type.kind is TypeKind.ARRAY else pg_type
    if shown is not None and shown.kind.warns:
        registry.warn_once(shown)
    return arrow_type_of(pg_type, type_modifier)


def text_column_to_arrow(
    values: pa.Array,
    arrow_type: pa.DataType,
    pg_type: PgType | None = None,
    *,
    registry: TypeRegistry | None = None,
    column: Column | None = None,
    binary: bool = False,
) -> pa.Array:
    """Convert a column of PostgreSQL text values (COPY text, pgoutput ``t``
    values; NULL for SQL NULL) into ``arrow_type``, as given by
    :func:`arrow_type_for`. ``binary=True`` takes binary send forms instead
    (pgoutput ``b`` values) for the fixed-width types.
    See :mod:`headrace.source.postgres.convert` for the settings the text
    must have been produced under and the few lossy cases.

    The PostgreSQL type is ``pg_type``, or else ``registry.lookup(column.type_oid)``."""
    if pg_type is None:
        if registry is None or column is None:
            raise TypeError("text_column_to_arrow needs pg_type, or registry and column")
        pg_type = registry.lookup(column.type_oid)
    return convert_column(values, arrow_type, pg_type, binary=binary)
