"""Rollup measures as small classes: state columns, delta, merge, roll-up and final value.

A rollup's state table holds, per (bucket, dimension values), the row count
``_hr_rows`` and each measure's state parts. A batch contributes *weighted*
rows (``_hr_w`` = +1 for new row versions, -1 for retracted ones; netted
first only for floating-point sums), and each measure says how those become a
delta, how a delta merges into the state, how base buckets roll up into a
coarser grain, and what the final value is:

==========================  ===================================  =========================
measure                     state parts                          final value
==========================  ===================================  =========================
count [col/expr] [where]    ``c`` (matching rows)                ``c``
sum                         ``s`` (sum), ``n`` (non-NULL inputs)  ``s`` when ``n > 0``
avg                         ``s``, ``n``                          ``s / n``
min / max                   ``v`` (the extreme)                  ``v``
count_distinct              side table (bucket, dims, value, n)  distinct values with n > 0
approx_count_distinct       side table (bucket, dims, reg, rho,  HyperLogLog estimate
                            n): a retractable HyperLogLog
==========================  ===================================  =========================

min/max under retraction: when a batch retracts a value equal to (or
beyond) the current extreme of a group and adds none at or beyond it, the
group takes its next extreme from its reserve (the values near its extremes,
:mod:`headrace.engine.reserve`), or from the mirror when the reserve ran out
(see :meth:`Extreme.recompute_condition`).

approx_count_distinct keeps, per group, register and rank (the HyperLogLog
register index and the position of the lowest set bit of the rest of the
64-bit ``hash()`` of the value), the number of current rows with that
(register, rank). A register's value is the largest rank with n > 0, so a
retraction removes exactly what the insertion added and the estimate equals
that of a HyperLogLog built from scratch over the current rows. Coarser
grains take the register-wise maximum over their base buckets (a union).
State size per group is bounded by 2^p x ranks, typically a few thousand rows.

An approx_count_distinct of the same value and filter as an exact count_distinct of
the same rollup keeps no table of its own (nor do two distinct counts of the same
kind, value and filter): its view derives register and rank from the exact
measure's side table (the values with n > 0), the same registers, so the same
estimate, with nothing more to maintain per batch (see ``RollupPlan.side_owner``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from headrace.engine.reserve import Reserve
from headrace.pipeline.model import MeasureConfig, MeasureFn, quote_ident

HLL_PRECISION = 12
"""2^12 = 4096 registers: standard error about 1.04 / sqrt(4096) = 1.6%."""


@dataclass(frozen=True)
class MeasureInputs:
    """Projection columns a measure reads: its value and its filter (either may be absent)."""

    value: str | None
    filter: str | None

    def condition(self, *, require_value: bool) -> str | None:
        """SQL selecting the rows that count (filter true and, if needed, a non-NULL value)."""
        parts = []
        if self.filter is not None:
            parts.append(self.filter)
        if require_value and self.value is not None:
            parts.append(f"{self.value} IS NOT NULL")
        return " AND ".join(parts) if parts else None


def _filtered(aggregate: str, condition: str | None) -> str:
    return f"{aggregate} FILTER (WHERE {condition})" if condition else aggregate


def _and(*conditions: str | None) -> str | None:
    parts = [c for c in conditions if c]
    return " AND ".join(parts) if parts else None


class Measure(ABC):
    """Base: one configured measure at position ``index`` of its rollup."""

    side_table: str | None = None
    """Suffix of the measure's side table (``distinct_<i>``/``hll_<i>``), if it has one."""

    def __init__(self, config: MeasureConfig, index: int, inputs: MeasureInputs) -> None:
        self.config = config
        self.index = index
        self.inputs = inputs

    @property
    def name(self) -> str:
        return self.config.name

    def part(self, suffix: str) -> str:
        """Name of a state column of this measure."""
        return f"_hr_m{self.index}_{suffix}"

    def state_parts(self) -> list[str]:
        return []

    def build(self) -> list[str]:
        """Aggregates over mirror projection rows (no weights), one per state part."""
        return []

    def delta(self) -> list[tuple[str, str]]:
        """(name, aggregate) over netted weighted rows (``_hr_w``): the delta row's columns."""
        return []

    def merge(self, state: str, delta: str) -> list[str]:
        """``SET`` expressions combining an existing state row with a delta row."""
        return []

    def insert(self, delta: str) -> list[str]:
        """Values of the state parts for a new group, from the delta row."""
        return []

    def coarse(self) -> list[str]:
        """Aggregates rolling base-grain state rows up into a coarser bucket, one per part."""
        return []

    @abstractmethod
    def final(self, state: str) -> str:
        """The measure's value from (rolled-up) state columns of alias ``state``."""

    def recompute_condition(self, state: str, delta: str) -> str | None:
        """When true for a group, recompute this measure from the mirror after the batch."""
        return None


class Count(Measure):
    """``count``: rows (or non-NULL values) matching the filter."""

    def _condition(self) -> str | None:
        return self.inputs.condition(require_value=True)

    def state_parts(self) -> list[str]:
        return [self.part("c")]

    def build(self) -> list[str]:
        return [f"CAST({_filtered('count(*)', self._condition())} AS BIGINT)"]

    def delta(self) -> list[tuple[str, str]]:
        return [(self.part("c"), f"coalesce({_filtered('sum(_hr_w)', self._condition())}, 0)")]

    def merge(self, state: str, delta: str) -> list[str]:
        c = self.part("c")
        return [f"{c} = {state}.{c} + {delta}.{c}"]

    def insert(self, delta: str) -> list[str]:
        return [f"{delta}.{self.part('c')}"]

    def coarse(self) -> list[str]:
        return [f"sum({self.part('c')})"]

    def final(self, state: str) -> str:
        return f"CAST({state}.{self.part('c')} AS BIGINT)"


class Sum(Measure):
    """``sum``: exact for integers (HUGEINT) and numerics; DOUBLE sums accumulate rounding."""

    def __init__(
        self, config: MeasureConfig, index: int, inputs: MeasureInputs, sum_type: str
    ) -> None:
        super().__init__(config, index, inputs)
        self.sum_type = sum_type

    def _condition(self) -> str | None:
        return self.inputs.condition(require_value=True)

    def state_parts(self) -> list[str]:
        return [self.part("s"), self.part("n")]

    def build(self) -> list[str]:
        total = _filtered(f"sum({self.inputs.value})", self._condition())
        return [
            f"CAST(coalesce({total}, 0) AS {self.sum_type})",
            f"CAST({_filtered('count(*)', self._condition())} AS BIGINT)",
        ]

    def delta(self) -> list[tuple[str, str]]:
        value = self.inputs.value
        weighted = f"CAST({value} AS {self.sum_type}) * _hr_w"
        return [
            (self.part("s"), f"coalesce({_filtered(f'sum({weighted})', self._condition())}, 0)"),
            (self.part("n"), f"coalesce({_filtered('sum(_hr_w)', self._condition())}, 0)"),
        ]

    def merge(self, state: str, delta: str) -> list[str]:
        s, n = self.part("s"), self.part("n")
        return [f"{s} = {state}.{s} + {delta}.{s}", f"{n} = {state}.{n} + {delta}.{n}"]

    def insert(self, delta: str) -> list[str]:
        return [f"{delta}.{self.part('s')}", f"{delta}.{self.part('n')}"]

    def coarse(self) -> list[str]:
        return [f"sum({self.part('s')})", f"sum({self.part('n')})"]

    def final(self, state: str) -> str:
        s, n = self.part("s"), self.part("n")
        return f"CASE WHEN {state}.{n} > 0 THEN CAST({state}.{s} AS {self.sum_type}) END"


class Avg(Sum):
    """``avg``: the sum over the count of non-NULL inputs, as DOUBLE."""

    def final(self, state: str) -> str:
        s, n = self.part("s"), self.part("n")
        return f"CASE WHEN {state}.{n} > 0 THEN CAST({state}.{s} AS DOUBLE) / {state}.{n} END"


class Extreme(Measure):
    """``min`` / ``max``, recomputed from the mirror when the extreme is retracted."""

    def __init__(self, config: MeasureConfig, index: int, inputs: MeasureInputs) -> None:
        super().__init__(config, index, inputs)
        self.function = "min" if config.fn is MeasureFn.MIN else "max"
        self.combine = "least" if config.fn is MeasureFn.MIN else "greatest"
        self.beyond = "<=" if config.fn is MeasureFn.MIN else ">="
        self.reserve: Reserve | None = None
        """The reserve holding this measure's next values (set by the rollup's plan)."""

    def _condition(self) -> str | None:
        return self.inputs.condition(require_value=True)

    def state_parts(self) -> list[str]:
        return [self.part("v")]

    def build(self) -> list[str]:
        return [_filtered(f"{self.function}({self.inputs.value})", self._condition())]

    def delta(self) -> list[tuple[str, str]]:
        value = self.inputs.value
        return [
            (
                self.part("v"),
                _filtered(f"{self.function}({value})", _and(self._condition(), "_hr_w > 0")),
            ),
            (
                self.part("retracted"),
                _filtered(f"{self.function}({value})", _and(self._condition(), "_hr_w < 0")),
            ),
        ]

    def merge(self, state: str, delta: str) -> list[str]:
        v = self.part("v")
        return [f"{v} = {self.combine}({state}.{v}, {delta}.{v})"]

    def insert(self, delta: str) -> list[str]:
        return [f"{delta}.{self.part('v')}"]

    def coarse(self) -> list[str]:
        return [f"{self.function}({self.part('v')})"]

    def final(self, state: str) -> str:
        return f"{state}.{self.part('v')}"

    def recompute_condition(self, state: str, delta: str) -> str | None:
        """The batch retracted a value at (or beyond) the current extreme and added none
        at or beyond it: when it added one, every remaining row is on the other side of
        the old extreme, so the added extreme is the new one (no recompute)."""
        retracted, v = f"{delta}.{self.part('retracted')}", f"{state}.{self.part('v')}"
        added = f"{delta}.{self.part('v')}"
        return (
            f"({retracted} IS NOT NULL AND {retracted} {self.beyond} {v} "
            f"AND ({added} IS NULL OR NOT ({added} {self.beyond} {v})))"
        )

    def merge_recomputed(self, state: str, delta: str) -> list[str]:
        """:meth:`merge`, taking the recomputed extreme (``_hr_m<i>_r``) when the batch
        retracted the current one."""
        v = self.part("v")
        return [
            f"{v} = CASE WHEN {self.recompute_condition(state, delta)} "
            f"THEN {delta}.{self.part('r')} ELSE {self.combine}({state}.{v}, {delta}.{v}) END"
        ]


class CountDistinct(Measure):
    """``count_distinct``: exact, from a side table of (bucket, dims, value, n)."""

    def __init__(self, config: MeasureConfig, index: int, inputs: MeasureInputs) -> None:
        super().__init__(config, index, inputs)
        self.side_table = f"distinct_{index}"

    def condition(self) -> str | None:
        return self.inputs.condition(require_value=True)

    def side_keys(self) -> list[tuple[str, str]]:
        """(column name, SQL over projection rows) of the side table's own key columns."""
        return [("_hr_value", str(self.inputs.value))]

    def final(self, state: str) -> str:
        return f"coalesce({state}.{self.part('d')}, 0)"

    def side_result(self) -> str:
        """Aggregate over side rows (grouped per output bucket and dims) giving the value."""
        return f"CAST(count(DISTINCT _hr_value) AS BIGINT) AS {self.part('d')}"


class ApproxCountDistinct(CountDistinct):
    """``approx_count_distinct``: a retractable HyperLogLog (see the module docstring)."""

    def __init__(self, config: MeasureConfig, index: int, inputs: MeasureInputs) -> None:
        super().__init__(config, index, inputs)
        self.side_table = f"hll_{index}"

    def side_keys(self) -> list[tuple[str, str]]:
        return self.register_keys(str(self.inputs.value))

    @staticmethod
    def register_keys(value: str) -> list[tuple[str, str]]:
        """(column name, SQL) of the register and rank of the value ``value`` (SQL)."""
        p = HLL_PRECISION
        hashed = f"hash({value})"
        rest = f"({hashed} & ((1::UBIGINT << {64 - p}) - 1))"
        rank = (
            f"CAST(CASE WHEN {rest} = 0 THEN {64 - p + 1} "
            f"ELSE bit_count(({rest} & ~({rest} - 1)) - 1) + 1 END AS TINYINT)"
        )
        return [("_hr_reg", f"CAST({hashed} >> {64 - p} AS SMALLINT)"), ("_hr_rank", rank)]

    def final(self, state: str) -> str:
        return f"coalesce({state}.{self.part('d')}, 0)"

    @staticmethod
    def estimate(registers: str, zeros: str) -> str:
        """HyperLogLog estimate from ``sum(2^-rank)`` over set registers and the zero count."""
        m = 1 << HLL_PRECISION
        alpha = 0.7213 / (1 + 1.079 / m)
        raw = f"({alpha * m * m} / ({registers} + {zeros}))"
        return (
            f"CAST(round(CASE WHEN {raw} <= {2.5 * m} AND {zeros} > 0 "
            f"THEN {m} * ln({m} / {zeros}) ELSE {raw} END) AS BIGINT)"
        )


def make_measure(
    config: MeasureConfig,
    index: int,
    inputs: MeasureInputs,
    value_type: str | None,
    sum_type: str | None,
) -> Measure:
    """The measure class for ``config.fn``."""
    fn = config.fn
    if fn is MeasureFn.COUNT:
        return Count(config, index, inputs)
    if fn in (MeasureFn.SUM, MeasureFn.AVG):
        if sum_type is None:
            raise ValueError(f"{fn.value} of {config.name} needs a summable value")
        cls = Sum if fn is MeasureFn.SUM else Avg
        return cls(config, index, inputs, sum_type)
    if fn in (MeasureFn.MIN, MeasureFn.MAX):
        return Extreme(config, index, inputs)
    if fn is MeasureFn.COUNT_DISTINCT:
        return CountDistinct(config, index, inputs)
    return ApproxCountDistinct(config, index, inputs)


def output_name(name: str) -> str:
    """Quoted output column name."""
    return quote_ident(name)
