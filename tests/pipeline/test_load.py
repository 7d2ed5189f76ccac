"""headrace.yaml loading: one test per kind of mistake, each naming file, line, field, allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.errors import ConfigError
from headrace.pipeline import model
from headrace.pipeline.catalog import TableCatalog
from headrace.pipeline.check_catalog import check_against_catalog
from headrace.pipeline.load import load_pipeline, parse_pipeline
from headrace.pipeline.model import MeasureFn, PipelineConfig
from headrace.source.changes import TableRef

GOOD = """\
source:
  dsn_env: HEADRACE_DSN
  tables:
    accounts: {}
    public.transactions:
      event_time: created_at
      history: true
      retention: 90d
rollups:
  - name: tx_volume
    table: transactions
    grain: 5m
    coarser: [1h, 1d]
    retention: 30d
    dimensions:
      - status
      - name: big
        expr: "amount >= 1000"
      - name: tier
        lookup: {table: accounts, on: account_id, column: tier}
    measures:
      - {name: tx_count, fn: count}
      - {name: volume, fn: sum, column: amount}
      - {name: declined, fn: sum, column: amount, where: "status = 'declined'"}
      - {name: accounts, fn: count_distinct, column: account_id}
      - {name: accounts_approx, fn: approx_count_distinct, expr: "account_id"}
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(text, "headrace.yaml")
    return str(caught.value)


def test_a_good_file_loads() -> None:
    config = parse_pipeline(GOOD)
    rollup = config.rollup("tx_volume")
    assert [g.total_seconds() for g in rollup.grains] == [300, 3600, 86400]
    assert rollup.dimensions[0].column == "status"
    assert rollup.dimensions[2].lookup is not None
    assert rollup.dimensions[2].lookup.on == ["account_id"]  # `on:` is not YAML 1.1's True
    assert rollup.measures[3].fn is MeasureFn.COUNT_DISTINCT
    assert TableRef("public", "transactions") in config.table_refs
    # Durations dump back as written.
    assert config.model_dump(mode="json")["rollups"][0]["grain"] == "5m"


def test_every_field_is_documented() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            assert field.description, f"{model.__name__}.{name} has no description"

    for cls in (
        model.PipelineConfig,
        model.SourceConfig,
        model.TableConfig,
        model.StoreConfig,
        model.RollupConfig,
        model.DimensionConfig,
        model.LookupConfig,
        model.MeasureConfig,
    ):
        walk(cls)


def test_relative_store_path_is_next_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "headrace.yaml"
    path.write_text(GOOD + "store: {path: data/h.duckdb}\n")
    assert load_pipeline(path).store.path == str(tmp_path.resolve() / "data/h.duckdb")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the pipeline file"):
        load_pipeline(tmp_path / "nope.yaml")


def test_yaml_syntax() -> None:
    message = error_of("source:\n  tables: [a\n")
    assert "headrace.yaml:" in message
    assert "not valid YAML" in message


def test_not_a_mapping() -> None:
    assert "must be a mapping" in error_of("- a\n- b\n")


def test_unknown_field_lists_the_allowed_ones() -> None:
    message = error_of(GOOD.replace("history: true", "histroy: true"))
    assert "headrace.yaml:7: source.tables.public.transactions.histroy: unknown field" in message
    assert "allowed: primary_key, event_time, mirror, history, retention" in message


def test_missing_required_field() -> None:
    message = error_of(GOOD.replace("    grain: 5m\n", ""))
    assert "rollups[0].grain: required field missing" in message
    assert "Bucket width" in message  # the field's documentation says what to write


def test_wrong_enum_value() -> None:
    message = error_of(GOOD.replace("fn: sum, column: amount}", "fn: total, column: amount}"))
    assert "rollups[0].measures[1].fn" in message
    assert "'count', 'sum', 'min', 'max', 'avg', 'count_distinct'" in message


def test_wrong_type() -> None:
    message = error_of(GOOD.replace("history: true", "history: often"))
    assert "source.tables.public.transactions.history" in message


def test_bad_duration() -> None:
    message = error_of(GOOD.replace("grain: 5m", "grain: 5 minutes"))
    assert "rollups[0].grain: not a duration: '5 minutes'" in message
    assert "e.g. 30s, 5m, 1h" in message


def test_coarser_grain_not_a_multiple() -> None:
    message = error_of(GOOD.replace("[1h, 1d]", "[7m, 1d]"))
    assert "headrace.yaml:13: rollups[0].coarser[0]: 7m is not a larger multiple" in message


def test_retention_shorter_than_the_coarsest_grain() -> None:
    assert "shorter than the coarsest grain" in error_of(
        GOOD.replace("retention: 30d", "retention: 1h")
    )


def test_duplicate_rollup_names() -> None:
    rollup = GOOD[GOOD.index("  - name: tx_volume") :]
    assert "a second rollup named 'tx_volume'" in error_of(GOOD + rollup)


def test_bad_rollup_name() -> None:
    message = error_of(GOOD.replace("name: tx_volume", "name: Tx-Volume"))
    assert "not a valid rollup name" in message
    assert "lowercase letters" in message


def test_unknown_table() -> None:
    message = error_of(GOOD.replace("table: transactions", "table: transaction"))
    assert "rollups[0].table: table 'transaction' is not one of source.tables" in message
    assert "allowed: accounts, public.transactions" in message


def test_rollup_on_a_table_without_mirror() -> None:
    message = error_of(
        GOOD.replace("      history: true\n", "      history: true\n      mirror: false\n")
    )
    assert "has mirror: false" in message


def test_lookup_of_an_unknown_table() -> None:
    message = error_of(GOOD.replace("{table: accounts,", "{table: acounts,"))
    assert "rollups[0].dimensions[2].lookup.table: looked-up table 'acounts'" in message


def test_lookup_of_itself() -> None:
    message = error_of(GOOD.replace("{table: accounts,", "{table: transactions,"))
    assert "a table cannot look itself up" in message


def test_dimension_with_two_sources() -> None:
    message = error_of(GOOD.replace('expr: "amount >= 1000"', "expr: x\n        column: y"))
    assert "rollups[0].dimensions[1]: gives column, expr of column/expr/lookup" in message


@pytest.mark.parametrize(
    ("expression", "complaint"),
    [
        ("amount >=", "not valid SQL"),
        ("(SELECT max(amount) FROM transactions)", "not a statement"),
        ("amount > (SELECT 1)", "a subquery"),
        ("sum(amount)", "an aggregate function"),
        ("random() > 0.5", "random()"),
        ("now() - created_at", "now()"),
        ("t.amount > 1", "names a table"),
        ("amount > 1; DROP TABLE x", "not several statements"),
        ("row_number() OVER ()", "window function"),
    ],
)
def test_invalid_expressions(expression: str, complaint: str) -> None:
    message = error_of(GOOD.replace('"amount >= 1000"', f'"{expression}"'))
    assert "rollups[0].dimensions[1].expr" in message
    assert complaint in message


def test_invalid_filter() -> None:
    message = error_of(GOOD.replace("status = 'declined'", "status = "))
    assert "rollups[0].measures[2].where: not valid SQL" in message


def test_measure_without_a_value() -> None:
    message = error_of(GOOD.replace("fn: sum, column: amount}", "fn: sum}"))
    assert "rollups[0].measures[1]: sum needs a value" in message


def test_reserved_and_duplicate_output_names() -> None:
    assert "'bucket' is used twice" in error_of(GOOD.replace("name: big", "name: bucket"))
    assert "'_hr_x' is reserved" in error_of(GOOD.replace("name: big", "name: _hr_x"))


def test_dsn_and_dsn_env() -> None:
    assert "no connection given" in error_of(GOOD.replace("  dsn_env: HEADRACE_DSN\n", ""))
    both = GOOD.replace("dsn_env: HEADRACE_DSN", "dsn_env: X\n  dsn: postgresql://x")
    assert "either dsn or dsn_env" in error_of(both)


def test_table_settings() -> None:
    assert "retention applies to the history" in error_of(GOOD.replace("      history: true\n", ""))
    assert "keeps neither a mirror nor a history" in error_of(
        GOOD.replace("accounts: {}", "accounts: {mirror: false}").replace(
            "lookup: {table: accounts, on: account_id, column: tier}", "column: tier"
        )
    )


def test_all_problems_at_once() -> None:
    message = error_of(GOOD.replace("grain: 5m", "grain: 5x").replace("fn: count}", "fn: cnt}"))
    assert message.startswith("2 problems:")


# ---------------------------------------------------------------- catalog checks


def catalogs() -> dict[TableRef, TableCatalog]:
    return {
        TableRef("public", "accounts"): TableCatalog(
            TableRef("public", "accounts"),
            {"id": "integer", "tier": "text"},
            frozenset(),
            ("id",),
        ),
        TableRef("public", "transactions"): TableCatalog(
            TableRef("public", "transactions"),
            {
                "id": "bigint",
                "account_id": "integer",
                "amount": "numeric(18,2)",
                "status": "text",
                "created_at": "timestamp with time zone",
            },
            frozenset({"created_at"}),
            ("id",),
        ),
    }


def catalog_problems(text: str) -> list[str]:
    config: PipelineConfig = parse_pipeline(text)
    return [p.render("headrace.yaml") for p in check_against_catalog(config, catalogs())]


def test_catalog_good() -> None:
    assert catalog_problems(GOOD) == []


def test_catalog_unknown_columns() -> None:
    problems = catalog_problems(
        GOOD.replace("- status", "- state").replace("amount >= 1000", "amonut >= 1000")
    )
    assert any("dimensions[0].column: no column 'state'" in p for p in problems), problems
    assert any("dimensions[1].expr: no column 'amonut'" in p for p in problems), problems
    assert all("allowed: id, account_id, amount" in p for p in problems)


def test_catalog_event_time_not_a_time() -> None:
    problems = catalog_problems(GOOD.replace("event_time: created_at", "event_time: amount"))
    assert any("amount is numeric(18,2), not a time" in p for p in problems), problems


def test_catalog_lookup_arity_and_column() -> None:
    problems = catalog_problems(
        GOOD.replace("on: account_id, column: tier", "on: [account_id, status], column: tire")
    )
    assert any("2 column(s) for the 1-column key (id) of accounts" in p for p in problems)
    assert any("lookup.column: no column 'tire' in accounts" in p for p in problems)


def test_catalog_missing_table_and_key() -> None:
    partial = {TableRef("public", "accounts"): catalogs()[TableRef("public", "accounts")]}
    config = parse_pipeline(GOOD)
    rendered = [p.render("f") for p in check_against_catalog(config, partial)]
    assert any("table public.transactions does not exist" in p for p in rendered)
    keyless = {
        ref: TableCatalog(c.table, c.columns, c.time_columns, ()) for ref, c in catalogs().items()
    }
    rendered = [p.render("f") for p in check_against_catalog(config, keyless)]
    assert any("has no primary key or replica identity index" in p for p in rendered)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            GOOD.replace("    accounts: {}", "    not a table: {}"),
            ("not a table name: 'not a table'", "`table` or `schema.table`"),
            id="table-name",
        ),
        pytest.param(
            GOOD.replace("    accounts: {}", "    accounts: {}\n    public.accounts: {}"),
            ("the same table as 'accounts'",),
            id="same-table-twice",
        ),
        pytest.param(
            GOOD.replace("    accounts: {}", "    accounts: {primary_key: []}"),
            ("primary_key", "one or more column names, or leave it out"),
            id="empty-primary-key",
        ),
        pytest.param(
            GOOD.replace("    grain: 5m\n", "    time: commit\n    grain: 5m\n"),
            ("commit time needs the table's event_time to be `commit`",),
            id="commit-time-on-an-event-time-table",
        ),
        # Durations are whole numbers of a unit, so only 0s is finer than a second.
        pytest.param(
            GOOD.replace("grain: 5m", "grain: 0s").replace("[1h, 1d]", "[]"),
            ("too fine", "whole seconds, at least 1s"),
            id="grain-under-a-second",
        ),
        pytest.param(
            GOOD.replace("on: account_id, column: tier", "on: [], column: tier"),
            ("lookup.on", "empty"),
            id="lookup-on-nothing",
        ),
        pytest.param(
            GOOD.replace(
                "fn: sum, column: amount}", 'fn: sum, column: amount, expr: "amount * 2"}'
            ),
            ("gives both column and expr",),
            id="measure-with-column-and-expr",
        ),
        pytest.param(
            GOOD + "store:\n  memory_limit: lots\n",
            ("store.memory_limit", "lots"),
            id="store-memory-limit-not-a-size",
        ),
        pytest.param(
            GOOD + "store:\n  row_group_size: 3000\n",
            ("store.row_group_size", "multiple of 2048"),
            id="store-row-group-size-not-a-multiple-of-a-vector",
        ),
        pytest.param(
            GOOD + "store:\n  mirror_key_index: sometimes\n",
            ("store.mirror_key_index", "should be auto, true or false, not 'sometimes'"),
            id="store-mirror-key-index-not-a-mode",
        ),
        pytest.param(
            GOOD + "store:\n  mirror_key_index_rows: -1\n",
            ("store.mirror_key_index_rows", "greater than or equal to 0"),
            id="store-mirror-key-index-rows-negative",
        ),
    ],
)
def test_each_mistake_is_named(text: str, expected: tuple[str, ...]) -> None:
    message = error_of(text)
    for part in expected:
        assert part in message


def test_catalog_unknown_key_time_lookup_and_measure_columns() -> None:
    problems = catalog_problems(
        GOOD.replace("    accounts: {}", "    accounts: {primary_key: [uid]}")
        .replace("event_time: created_at", "event_time: booked_at")
        .replace("on: account_id, column: tier", "on: acount_id, column: tier")
        .replace("status = 'declined'", "stat = 'declined'")
        .replace('expr: "account_id"', 'expr: "acount"')
    )
    for expected in ("uid", "booked_at", "acount_id", "stat", "acount"):
        assert any(f"'{expected}'" in p or f" {expected} " in p for p in problems), (
            expected,
            problems,
        )


@pytest.mark.parametrize(
    ("written", "mode"),
    [("auto", "auto"), ("AUTO", "auto"), ("true", True), ("off", False), ("'no'", False)],
)
def test_mirror_key_index_modes(written: str, mode: object) -> None:
    config = parse_pipeline(GOOD + f"store:\n  mirror_key_index: {written}\n")
    assert config.store.mirror_key_index == mode
