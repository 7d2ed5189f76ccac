"""Looked-up dimensions: a value of another mirrored table recorded with each row version.

Semantics: when a row version of the fact table is applied (insert or
update), each looked-up dimension is resolved against the looked-up table
*as of that change in commit order* — changes of the looked-up table earlier
in the same batch are visible, later ones are not — and recorded in the
fact's mirror row (hidden column ``_hr_lk_…``). A retraction subtracts
exactly the value that was added. A later change of the looked-up row
(the account's tier) does not move fact rows already counted; the fact
row's next update picks up the value current at that update. A missing
looked-up row gives NULL.

Implementation: the looked-up table's versions relevant to the batch — its
mirror rows before the batch (at ``_hr_seq = -1``), every insert/update in
the batch, every delete / key move away (absent), and every truncate
(absent for every key) — joined to the fact's end rows (for each change, its
key's last version before it in ``_hr_seq`` order), in the statement creating
the end rows (a
looked-up table without changes in the batch is joined directly).
"""

from __future__ import annotations

import duckdb

from headrace.engine.resolve import LookupJoins, TableWork, old_key
from headrace.engine.tables import LookupColumn, TableModel
from headrace.pipeline.model import quote_ident
from headrace.source.changes import OP, SEQ


def lookup_joins(
    con: duckdb.DuckDBPyConnection,
    fact: TableWork,
    targets: dict[str, tuple[TableModel, TableWork | None]],
) -> LookupJoins:
    """Prepare the lookups of ``fact``'s end rows (joined into the statement creating them).

    ``targets`` maps each lookup column name to the looked-up table's model
    and its work in this batch (``None`` when it has no changes in it).
    Lookups of the same table on the same columns (an account's tier and its
    currency) share one join. A looked-up table without changes in the batch
    is joined as it is; one with changes gets a temp table of its versions
    (``_hr_lv_<i>``, one statement) joined on the key and the batch order.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[LookupColumn]] = {}
    for name, lookup in fact.model.lookups.items():
        target, _ = targets[name]
        groups.setdefault((target.mirror, tuple(lookup.spec.on)), []).append(lookup)
    result = LookupJoins()
    for number, lookups in enumerate(groups.values()):
        target, work = targets[lookups[0].name]
        _join_group(
            con, fact, lookups, target, work=work, result=result, suffix=f"{fact.index}_{number}"
        )
    return result


def _join_group(
    con: duckdb.DuckDBPyConnection,
    fact: TableWork,
    lookups: list[LookupColumn],
    target: TableModel,
    *,
    work: TableWork | None,
    result: LookupJoins,
    suffix: str,
) -> None:
    values = [quote_ident(lookup.spec.column) for lookup in lookups]
    on = [quote_ident(c) for c in lookups[0].spec.on]
    keys = [quote_ident(k) for k in target.key]
    alias = f"_hr_l{suffix}"
    if work is None or work.num_changes == 0:
        match = " AND ".join(f"{alias}.{k} = c.{o}" for k, o in zip(keys, on, strict=True))
        result.joins.append(f"LEFT JOIN {target.mirror} {alias} ON {match}")
        for lookup, value in zip(lookups, values, strict=True):
            result.values[lookup.name] = f"{alias}.{value}"
        return
    versions = f"_hr_lv_{suffix}"
    wanted = f"(SELECT DISTINCT {', '.join(on)} FROM {fact.changes} WHERE {OP} IN ('I', 'U'))"
    semi = " AND ".join(f"t.{k} = e.{o}" for k, o in zip(keys, on, strict=True))
    as_key = ", ".join(f"e.{o} AS {k}" for o, k in zip(on, keys, strict=True))
    old_as_key = ", ".join(f"{old_key(j)} AS {k}" for j, k in enumerate(keys))
    moved = " OR ".join(f"{old_key(j)} <> {k}" for j, k in enumerate(keys))
    slots = [f"_hr_value{i}" for i in range(len(values))]
    mirror_values = ", ".join(f"t.{v} AS {slot}" for v, slot in zip(values, slots, strict=True))
    absent = ", ".join("NULL" for _ in values)
    c = work.changes
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {versions} AS
        SELECT {", ".join(f"t.{k}" for k in keys)}, CAST(-1 AS BIGINT) AS {SEQ},
               true AS _hr_present, {mirror_values}
        FROM {target.mirror} t SEMI JOIN {wanted} e ON {semi}
        UNION ALL
        SELECT {", ".join(keys)}, {SEQ}, true, {", ".join(values)} FROM {c} WHERE {OP} IN ('I', 'U')
        UNION ALL
        SELECT {old_as_key}, {SEQ}, false, {absent} FROM {c}
        WHERE {OP} = 'D' OR ({OP} = 'U' AND ({moved}))
        UNION ALL
        SELECT {as_key}, t.{SEQ}, false, {absent}
        FROM {wanted} e CROSS JOIN (SELECT {SEQ} FROM {c} WHERE {OP} = 'T') t"""
    )
    # The version of each fact change's key last before it: an equi-join on the key
    # and the latest earlier version per change (few versions per key in a batch;
    # measured cheaper than an ASOF join, which sorts both sides).
    match = " AND ".join(f"v.{k} = f.{o}" for k, o in zip(keys, on, strict=True))
    fields = ", ".join(f"{slot} := v.{slot}" for slot in slots)
    result.joins.append(
        f"""LEFT JOIN (
            SELECT f.{SEQ} AS _hr_fseq,
                   arg_max(struct_pack(_hr_present := v._hr_present, {fields}), v.{SEQ}) AS _hr_v
            FROM {fact.changes} f JOIN {versions} v ON {match} AND v.{SEQ} < f.{SEQ}
            WHERE f.{OP} IN ('I', 'U')
            GROUP BY f.{SEQ}
        ) {alias} ON {alias}._hr_fseq = c.{SEQ}"""
    )
    for lookup, slot in zip(lookups, slots, strict=True):
        result.values[lookup.name] = (
            f"CASE WHEN {alias}._hr_v._hr_present THEN {alias}._hr_v.{slot} END"
        )


def fill_lookup_column(
    con: duckdb.DuckDBPyConnection, fact: TableModel, lookup: LookupColumn, target: TableModel
) -> None:
    """Set a (new) lookup column of every fact mirror row from the looked-up mirror as it is now."""
    column = quote_ident(lookup.name)
    value = quote_ident(lookup.spec.column)
    match = " AND ".join(
        f"t.{quote_ident(k)} = {fact.mirror}.{quote_ident(o)}"
        for k, o in zip(target.key, lookup.spec.on, strict=True)
    )
    con.execute(
        f"UPDATE {fact.mirror} SET {column} = t.{value} FROM {target.mirror} t WHERE {match}"
    )
