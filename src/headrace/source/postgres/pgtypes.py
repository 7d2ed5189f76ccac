"""What headrace knows about PostgreSQL types: how each kind converts.

A :class:`PgType` is a type as the converter sees it: its kind (how its text
form becomes an Arrow value), the element type of an array, the base type's
modifier of a domain. The built-in types are listed here (OIDs are stable
across PostgreSQL versions); user types come from the catalog through
:class:`headrace.source.postgres.types.TypeRegistry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class TypeKind(StrEnum):
    """How a PostgreSQL type's values become Arrow values."""

    BOOL = "bool"
    INT2 = "int2"
    INT4 = "int4"
    INT8 = "int8"
    FLOAT4 = "float4"
    FLOAT8 = "float8"
    NUMERIC = "numeric"
    TEXT = "text"  # text, varchar, bpchar, name, "char"
    UUID = "uuid"
    DATE = "date"
    TIME = "time"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    INTERVAL = "interval"
    JSON = "json"  # json and jsonb: the JSON text
    BYTEA = "bytea"
    ENUM = "enum"  # the label
    ARRAY = "array"
    TEXTUAL = "textual"  # a known type deliberately kept as its text form (inet, money, ...)
    COMPOSITE = "composite"  # a row type: its text form, with a warning
    UNKNOWN = "unknown"  # not known at all: its text form, with a warning

    @property
    def warns(self) -> bool:
        """Whether columns of this kind log a warning (once per type)."""
        return self in (TypeKind.COMPOSITE, TypeKind.UNKNOWN)


@dataclass(frozen=True)
class PgType:
    """A PostgreSQL type resolved for conversion.

    For a domain, ``kind``/``element``/``base_modifier`` are those of its base
    type while ``oid``/``name`` stay the domain's.
    """

    oid: int
    name: str
    kind: TypeKind
    element: PgType | None = None
    base_modifier: int = -1  # a domain's typmod (e.g. numeric(10,2)); -1 when none
    delimiter: str = ","  # array element delimiter of the element type (";" for box)

    def modifier(self, column_modifier: int) -> int:
        """The effective type modifier of a column of this type."""
        return column_modifier if column_modifier != -1 else self.base_modifier


# Built-in base types whose conversion is specific.
BUILTIN_KINDS: Final[dict[int, tuple[str, TypeKind]]] = {
    16: ("bool", TypeKind.BOOL),
    17: ("bytea", TypeKind.BYTEA),
    18: ("char", TypeKind.TEXT),
    19: ("name", TypeKind.TEXT),
    20: ("int8", TypeKind.INT8),
    21: ("int2", TypeKind.INT2),
    23: ("int4", TypeKind.INT4),
    25: ("text", TypeKind.TEXT),
    26: ("oid", TypeKind.INT8),
    28: ("xid", TypeKind.INT8),
    29: ("cid", TypeKind.INT8),
    114: ("json", TypeKind.JSON),
    700: ("float4", TypeKind.FLOAT4),
    701: ("float8", TypeKind.FLOAT8),
    1042: ("bpchar", TypeKind.TEXT),
    1043: ("varchar", TypeKind.TEXT),
    1082: ("date", TypeKind.DATE),
    1083: ("time", TypeKind.TIME),
    1114: ("timestamp", TypeKind.TIMESTAMP),
    1184: ("timestamptz", TypeKind.TIMESTAMPTZ),
    1186: ("interval", TypeKind.INTERVAL),
    1700: ("numeric", TypeKind.NUMERIC),
    2950: ("uuid", TypeKind.UUID),
    3802: ("jsonb", TypeKind.JSON),
    5069: ("xid8", TypeKind.INT8),
}

# Other built-in base types: kept as their text form, on purpose (no warning).
BUILTIN_TEXTUAL: Final[dict[int, str]] = {
    22: "int2vector",
    24: "regproc",
    27: "tid",
    30: "oidvector",
    142: "xml",
    194: "pg_node_tree",
    600: "point",
    601: "lseg",
    602: "path",
    603: "box",
    604: "polygon",
    628: "line",
    650: "cidr",
    718: "circle",
    774: "macaddr8",
    790: "money",
    829: "macaddr",
    869: "inet",
    1033: "aclitem",
    1266: "timetz",
    1560: "bit",
    1562: "varbit",
    1790: "refcursor",
    2202: "regprocedure",
    2203: "regoper",
    2204: "regoperator",
    2205: "regclass",
    2206: "regtype",
    2970: "txid_snapshot",
    3220: "pg_lsn",
    3361: "pg_ndistinct",
    3402: "pg_dependencies",
    3614: "tsvector",
    3615: "tsquery",
    3642: "gtsvector",
    3734: "regconfig",
    3769: "regdictionary",
    3904: "int4range",
    3906: "numrange",
    3908: "tsrange",
    3910: "tstzrange",
    3912: "daterange",
    3926: "int8range",
    4072: "jsonpath",
    4089: "regnamespace",
    4096: "regrole",
    4191: "regcollation",
    4451: "int4multirange",
    4532: "nummultirange",
    4533: "tsmultirange",
    4534: "tstzmultirange",
    4535: "datemultirange",
    4536: "int8multirange",
    4600: "pg_brin_bloom_summary",
    4601: "pg_brin_minmax_multi_summary",
    5017: "pg_mcv_list",
    5038: "pg_snapshot",
}

# Built-in array types: array OID -> element OID (from PostgreSQL 15's pg_type;
# int2vector and oidvector are not arrays in text form and are left out).
BUILTIN_ARRAYS: Final[dict[int, int]] = {
    143: 142, 199: 114, 271: 5069, 629: 628, 651: 650, 719: 718, 775: 774, 791: 790,
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1006: 22, 1007: 23, 1008: 24,
    1009: 25, 1010: 27, 1011: 28, 1012: 29, 1013: 30, 1014: 1042, 1015: 1043, 1016: 20,
    1017: 600, 1018: 601, 1019: 602, 1020: 603, 1021: 700, 1022: 701, 1027: 604,
    1028: 26, 1034: 1033, 1040: 829, 1041: 869, 1115: 1114, 1182: 1082, 1183: 1083,
    1185: 1184, 1187: 1186, 1231: 1700, 1270: 1266, 1561: 1560, 1563: 1562, 2201: 1790,
    2207: 2202, 2208: 2203, 2209: 2204, 2210: 2205, 2211: 2206, 2949: 2970, 2951: 2950,
    3221: 3220, 3643: 3614, 3644: 3642, 3645: 3615, 3735: 3734, 3770: 3769, 3807: 3802,
    3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 4073: 4072,
    4090: 4089, 4097: 4096, 4192: 4191, 5039: 5038, 6150: 4451, 6151: 4532, 6152: 4533,
    6153: 4534, 6155: 4535, 6157: 4536,
}  # fmt: skip

BOX_OID: Final = 603

# PostgreSQL's infinite dates and timestamps in Arrow: DuckDB's sentinels
# (date32 days, int64 microseconds), which DuckDB reads back as infinity.
DATE_INFINITY: Final = 2**31 - 1
TIMESTAMP_INFINITY: Final = 2**63 - 1

# Objects created by initdb have OIDs below this; user objects at or above it.
FIRST_NON_BUILTIN_OID: Final = 10000


def builtin_type(oid: int) -> PgType | None:
    """The built-in type with this OID, or ``None`` when it is not built in."""
    known = BUILTIN_KINDS.get(oid)
    if known is not None:
        return PgType(oid, known[0], known[1])
    textual = BUILTIN_TEXTUAL.get(oid)
    if textual is not None:
        return PgType(oid, textual, TypeKind.TEXTUAL)
    element_oid = BUILTIN_ARRAYS.get(oid)
    if element_oid is not None:
        element = builtin_type(element_oid)
        if element is None:  # pragma: no cover - every element above is listed
            return None
        delimiter = ";" if element_oid == BOX_OID else ","
        return PgType(oid, f"_{element.name}", TypeKind.ARRAY, element, delimiter=delimiter)
    return None
