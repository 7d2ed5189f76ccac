"""Parser of PostgreSQL's array text form (``array_out``).

``{1,2,NULL}``, ``{"a,b","say \\"hi\\"",NULL,"NULL",""}``, ``{{1,2},{3,4}}`` and
``[0:1]={7,8}`` all parse into a flat list of element texts (``None`` for an
unquoted ``NULL``) plus the number of dimensions. Elements of nested arrays
come out in row-major order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# What array_in/array_out call whitespace (array_isspace), much less than
# Python's str.isspace (which includes \x1c-\x1f and Unicode spaces).
_PG_WHITESPACE = " \t\n\r\v\f"
_NEEDS_FULL_PARSE = re.compile(r'["\\{ \t\n\r\v\f]')


class ArraySyntaxError(ValueError):
    """The text is not a PostgreSQL array literal."""


@dataclass(frozen=True, slots=True)
class ParsedArray:
    """Elements of one array value, flattened, and its shape."""

    elements: list[str | None]
    dimensions: int  # 0 for an empty array
    has_bounds: bool  # a ``[lo:hi]=`` prefix (lower bound other than 1) was present


def parse_array(text: str, delimiter: str = ",") -> ParsedArray:
    """Parse one array literal as PostgreSQL's ``array_out`` writes it."""
    has_bounds = False
    if text.startswith("["):
        # Explicit bounds: "[0:1]={7,8}" or "[1:1][0:1]={{1,2}}".
        equals = text.find("=")
        if equals < 0:
            raise ArraySyntaxError(f"array bounds without '=': {text[:40]!r}")
        text = text[equals + 1 :]
        has_bounds = True
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        raise ArraySyntaxError(f"not an array literal: {text[:40]!r}")
    inner = text[1:-1]
    if not inner:
        return ParsedArray([], 0, has_bounds)
    if _NEEDS_FULL_PARSE.search(inner) is None:
        # Fast path: a one-dimensional array of plain elements (array_out
        # quotes every element holding a delimiter, quote, brace, backslash,
        # whitespace, or the word NULL).
        items = inner.split(delimiter)
        if "" in items:
            raise ArraySyntaxError(f"empty unquoted element in {text[:40]!r}")
        return ParsedArray([None if item == "NULL" else item for item in items], 1, has_bounds)
    elements, dimensions = _parse_general(text, delimiter)
    return ParsedArray(elements, dimensions, has_bounds)


def _parse_general(  # noqa: PLR0912 (a character-level scanner reads best as one loop)
    text: str, delimiter: str
) -> tuple[list[str | None], int]:
    elements: list[str | None] = []
    depth = 0
    max_depth = 0
    position = 0
    size = len(text)
    expect_element = True
    while position < size:
        char = text[position]
        if char == "{":
            if not expect_element:
                raise ArraySyntaxError(f"unexpected '{{' at {position}")
            depth += 1
            max_depth = max(max_depth, depth)
            position += 1
            continue
        if char == "}":
            depth -= 1
            if depth < 0:
                raise ArraySyntaxError(f"unbalanced '}}' at {position}")
            position += 1
            expect_element = False
            if depth == 0 and position != size:
                raise ArraySyntaxError(f"text after the array's closing brace at {position}")
            continue
        if char == delimiter:
            if expect_element:
                raise ArraySyntaxError(f"empty unquoted element at {position}")
            expect_element = True
            position += 1
            continue
        if char in _PG_WHITESPACE:
            position += 1
            continue
        if not expect_element:
            raise ArraySyntaxError(f"missing delimiter before position {position}")
        if depth == 0:
            raise ArraySyntaxError(f"element outside braces at {position}")
        if char == '"':
            value, position = _quoted(text, position + 1)
            elements.append(value)
        else:
            value, position = _unquoted(text, position, delimiter)
            elements.append(None if value == "NULL" else value)
        expect_element = False
    if depth != 0:
        raise ArraySyntaxError("unbalanced braces")
    return elements, max_depth


def _quoted(text: str, position: int) -> tuple[str, int]:
    parts: list[str] = []
    start = position
    size = len(text)
    while position < size:
        char = text[position]
        if char == "\\":
            parts.append(text[start:position])
            if position + 1 >= size:
                break
            parts.append(text[position + 1])
            position += 2
            start = position
        elif char == '"':
            parts.append(text[start:position])
            return "".join(parts), position + 1
        else:
            position += 1
    raise ArraySyntaxError("unterminated quoted element")


def _unquoted(text: str, position: int, delimiter: str) -> tuple[str, int]:
    parts: list[str] = []
    start = position
    size = len(text)
    while position < size:
        char = text[position]
        if char == "\\":
            parts.append(text[start:position])
            if position + 1 >= size:
                raise ArraySyntaxError("backslash at the end of the array")
            parts.append(text[position + 1])
            position += 2
            start = position
        elif char in (delimiter, "}", "{", '"'):
            break
        else:
            position += 1
    parts.append(text[start:position])
    # array_in trims unquoted whitespace; array_out never writes any.
    return "".join(parts).strip(_PG_WHITESPACE), position
