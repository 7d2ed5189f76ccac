"""Loading ``headrace.yaml``: parse, type-check, and check what spans several fields.

Every mistake is reported as a :class:`~headrace.errors.ConfigError` naming
the file, the line, the field path (``rollups[0].measures[1].fn``), what is
wrong and what is allowed. All problems of a file are reported at once.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from headrace.errors import ConfigError
from headrace.pipeline.durations import format_duration
from headrace.pipeline.expressions import ExpressionError, parse_row_expression
from headrace.pipeline.model import (
    COMMIT_TIME,
    DimensionConfig,
    MeasureConfig,
    MeasureFn,
    PipelineConfig,
    RollupConfig,
)
from headrace.source.changes import TableRef

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
IDENTIFIER_ALLOWED = "lowercase letters, digits and _, not starting with a digit"
RESERVED_PREFIX = "_hr_"
MAX_ROLLUP_NAME = 48

Path_ = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """YAML without the 1.1 booleans ``on``/``off``/``yes``/``no`` (``on:`` is a field here)."""


_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass(frozen=True)
class Problem:
    """One mistake in a pipeline file: where, what, and what is allowed."""

    path: Path_
    message: str
    allowed: str = ""

    def render(self, file: str, lines: Mapping[Path_, int] | None = None) -> str:
        line = _line_of(self.path, lines or {})
        where = f"{file}:{line}" if line else file
        text = f"{where}: {format_path(self.path) or '(top level)'}: {self.message}"
        return f"{text} (allowed: {self.allowed})" if self.allowed else text


def format_path(path: Path_) -> str:
    """``("rollups", 0, "fn")`` → ``rollups[0].fn``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Load, type-check and check a pipeline file; raise :class:`ConfigError` listing every problem.

    A relative ``store.path`` is made relative to the file's directory.
    """
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the pipeline file {file}: {exc.strerror or exc}",
            "pass an existing file with --config (default: headrace.yaml)",
        ) from exc
    config = parse_pipeline(text, str(file))
    store_path = Path(config.store.path)
    if not store_path.is_absolute():
        store = config.store.model_copy(update={"path": str(file.parent.resolve() / store_path)})
        config = config.model_copy(update={"store": store})
    return config


def parse_pipeline(text: str, file: str = "headrace.yaml") -> PipelineConfig:
    """Parse pipeline YAML text (``file`` only names it in errors)."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        lines = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        raise ConfigError(
            f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}",
            "fix the YAML syntax (indentation, quotes, colons)",
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: the file must be a mapping with a `source` section",
            "start from the example in the documentation of headrace.pipeline.model",
        )
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_problem_from_pydantic(error) for error in exc.errors()]
        raise _config_error(problems, file, lines) from None
    problems = check_pipeline(config)
    if problems:
        raise _config_error(problems, file, lines)
    return config


def raise_problems(problems: Sequence[Problem], file: str = "headrace.yaml") -> None:
    """Raise a :class:`ConfigError` for ``problems`` if there are any."""
    if problems:
        raise _config_error(problems, file, {})


def _config_error(
    problems: Sequence[Problem], file: str, lines: Mapping[Path_, int]
) -> ConfigError:
    rendered = [p.render(file, lines) for p in problems]
    head = (
        rendered[0]
        if len(rendered) == 1
        else f"{len(rendered)} problems:\n  " + "\n  ".join(rendered)
    )
    return ConfigError(head, f"edit {file} and check it with `headrace validate --config {file}`")


# ----------------------------------------------------------------------------
# checks spanning several fields (no database needed)


def check_pipeline(config: PipelineConfig) -> list[Problem]:
    """Every problem of ``config`` that can be found without the source database."""
    problems: list[Problem] = []
    source = config.source
    if source.dsn is not None and source.dsn_env is not None:
        problems.append(Problem(("source", "dsn_env"), "give either dsn or dsn_env, not both"))
    if source.dsn is None and source.dsn_env is None:
        problems.append(
            Problem(("source",), "no connection given", "`dsn: postgresql://...` or `dsn_env: VAR`")
        )
    seen: dict[TableRef, str] = {}
    for name, table in source.tables.items():
        path: Path_ = ("source", "tables", name)
        if not re.match(r"^[^.\s]+(\.[^.\s]+)?$", name):
            problems.append(
                Problem(path, f"not a table name: {name!r}", "`table` or `schema.table`")
            )
            continue
        ref = TableRef.parse(name)
        if ref in seen:
            problems.append(Problem(path, f"the same table as {seen[ref]!r}"))
        seen[ref] = name
        if not table.mirror and not table.history:
            problems.append(
                Problem(
                    path, "keeps neither a mirror nor a history", "mirror: true or history: true"
                )
            )
        if table.primary_key is not None and not table.primary_key:
            problems.append(
                Problem(
                    (*path, "primary_key"), "empty", "one or more column names, or leave it out"
                )
            )
        if table.retention is not None and not table.history:
            problems.append(
                Problem((*path, "retention"), "retention applies to the history", "history: true")
            )
    names: set[str] = set()
    for index, rollup in enumerate(config.rollups):
        path = ("rollups", index)
        if not IDENTIFIER.match(rollup.name) or len(rollup.name) > MAX_ROLLUP_NAME:
            problems.append(
                Problem(
                    (*path, "name"),
                    f"not a valid rollup name: {rollup.name!r}",
                    f"{IDENTIFIER_ALLOWED}, at most {MAX_ROLLUP_NAME} characters",
                )
            )
        if rollup.name in names:
            problems.append(Problem((*path, "name"), f"a second rollup named {rollup.name!r}"))
        names.add(rollup.name)
        problems.extend(_check_rollup(config, rollup, path))
    return problems


def _table_problem(config: PipelineConfig, name: str, path: Path_, role: str) -> Problem | None:
    ref = TableRef.parse(name)
    table = config.table_refs.get(ref)
    allowed = ", ".join(config.source.tables)
    if table is None:
        return Problem(path, f"{role} {name!r} is not one of source.tables", allowed)
    if not table.mirror:
        return Problem(path, f"{role} {name!r} has mirror: false", f"set mirror: true on {name}")
    return None


def _check_rollup(config: PipelineConfig, rollup: RollupConfig, path: Path_) -> list[Problem]:
    problems: list[Problem] = []
    table_problem = _table_problem(config, rollup.table, (*path, "table"), "table")
    if table_problem is not None:
        problems.append(table_problem)
    table = config.table_refs.get(TableRef.parse(rollup.table))
    if rollup.time == COMMIT_TIME and table is not None and table.event_time != COMMIT_TIME:
        problems.append(
            Problem(
                (*path, "time"),
                f"commit time needs the table's event_time to be `{COMMIT_TIME}`",
                f"a time column, or event_time: {COMMIT_TIME} on {rollup.table}",
            )
        )
    grain = int(rollup.grain.total_seconds())
    if grain < 1 or rollup.grain.total_seconds() != grain:
        problems.append(Problem((*path, "grain"), "too fine", "whole seconds, at least 1s"))
    previous = grain
    for index, coarser in enumerate(rollup.coarser):
        seconds = coarser.total_seconds()
        if grain >= 1 and (seconds % grain or seconds <= previous):
            problems.append(
                Problem(
                    (*path, "coarser", index),
                    f"{format_duration(coarser)} is not a larger multiple of the grain "
                    f"{format_duration(rollup.grain)} and of the grain before it",
                    "increasing multiples of the grain, e.g. [1h, 1d] for 5m",
                )
            )
        previous = int(seconds)
    if rollup.retention is not None and rollup.retention < max(rollup.grains):
        problems.append(
            Problem((*path, "retention"), "shorter than the coarsest grain", "a longer duration")
        )
    outputs: set[str] = {"bucket"}
    for index, dimension in enumerate(rollup.dimensions):
        problems.extend(
            _check_dimension(config, rollup, dimension, (*path, "dimensions", index), outputs)
        )
    for index, measure in enumerate(rollup.measures):
        problems.extend(_check_measure(measure, (*path, "measures", index), outputs))
    return problems


def _check_output_name(name: str, path: Path_, outputs: set[str]) -> list[Problem]:
    problems = []
    if name.startswith(RESERVED_PREFIX) or not name:
        problems.append(
            Problem(path, f"{name!r} is reserved", f"a name not starting with {RESERVED_PREFIX}")
        )
    elif name in outputs:
        problems.append(
            Problem(path, f"{name!r} is used twice (or is `bucket`)", "distinct names per rollup")
        )
    outputs.add(name)
    return problems


def _check_dimension(
    config: PipelineConfig,
    rollup: RollupConfig,
    dimension: DimensionConfig,
    path: Path_,
    outputs: set[str],
) -> list[Problem]:
    problems = _check_output_name(dimension.name, (*path, "name"), outputs)
    given = [k for k in ("column", "expr", "lookup") if getattr(dimension, k) is not None]
    if len(given) != 1:
        problems.append(
            Problem(
                path, f"gives {', '.join(given) or 'none'} of column/expr/lookup", "exactly one"
            )
        )
    if dimension.expr is not None:
        problems.extend(_check_expression(dimension.expr, (*path, "expr")))
    if dimension.lookup is not None:
        lookup = dimension.lookup
        problem = _table_problem(
            config, lookup.table, (*path, "lookup", "table"), "looked-up table"
        )
        if problem is not None:
            problems.append(problem)
        elif TableRef.parse(lookup.table) == TableRef.parse(rollup.table):
            problems.append(
                Problem(
                    (*path, "lookup", "table"), "a table cannot look itself up", "another table"
                )
            )
        if not lookup.on:
            problems.append(Problem((*path, "lookup", "on"), "empty", "one or more column names"))
    return problems


def _check_measure(measure: MeasureConfig, path: Path_, outputs: set[str]) -> list[Problem]:
    problems = _check_output_name(measure.name, (*path, "name"), outputs)
    if measure.column is not None and measure.expr is not None:
        problems.append(Problem(path, "gives both column and expr", "one of them"))
    if measure.fn is not MeasureFn.COUNT and measure.column is None and measure.expr is None:
        problems.append(
            Problem(path, f"{measure.fn.value} needs a value", "`column: <name>` or `expr: <sql>`")
        )
    if measure.expr is not None:
        problems.extend(_check_expression(measure.expr, (*path, "expr")))
    if measure.where is not None:
        problems.extend(_check_expression(measure.where, (*path, "where")))
    return problems


def _check_expression(sql: str, path: Path_) -> list[Problem]:
    try:
        parse_row_expression(sql)
    except ExpressionError as exc:
        return [
            Problem(
                path,
                f"{exc} in {sql!r}",
                "a DuckDB SQL expression over the row's columns (no subqueries, aggregates, "
                "other tables or time-dependent functions)",
            )
        ]
    return []


def _problem_from_pydantic(error: Any) -> Problem:
    loc: Path_ = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        return Problem(loc, f"unknown field {loc[-1]!r}", ", ".join(fields))
    if kind == "missing":
        return Problem(loc, "required field missing", _describe_field(loc))
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return Problem(loc, message, _describe_field(loc) if kind != "enum" else "")


def _fields_at(loc: Path_) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _describe_field(loc: Path_) -> str:
    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return ""
    field = model.model_fields.get(loc[-1])
    return (field.description or "") if field is not None else ""


def _model_at(loc: Path_) -> type[BaseModel] | None:
    """The model class found by walking ``loc`` down from :class:`PipelineConfig`."""
    current: Any = PipelineConfig
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin is list and args:
            current = args[0]
        elif origin is dict and len(args) == 2:
            current = args[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


# ----------------------------------------------------------------------------
# line numbers


def _line_map(text: str) -> dict[Path_, int]:
    """Line (1-based) of every mapping value and sequence item, by path."""
    lines: dict[Path_, int] = {}
    root = yaml.compose(text, Loader=_Loader)
    if root is None:
        return lines

    def walk(node: yaml.Node, path: Path_) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
                    lines[(*path, key.value)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, index))

    walk(root, ())
    return lines


def _line_of(path: Path_, lines: Mapping[Path_, int]) -> int | None:
    for end in range(len(path), -1, -1):
        line = lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return None
