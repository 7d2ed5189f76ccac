"""``headrace bench snapshot`` runs end to end (tiny size; timings are not checked)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from headrace.bench.snapshot import run


def test_bench_snapshot_prints_rates_and_a_json_line() -> None:
    out = io.StringIO()
    result = run(3000, 2, unix=True, console=Console(file=out, width=200, highlight=False))
    lines = out.getvalue().strip().splitlines()
    last = json.loads(lines[-1])
    assert last["rows"] == 3000
    assert last["workers"] == 2
    assert last["snapshot_rows_per_s"] > 0
    assert last["ratio_vs_raw_parallel"] == result.ratio_vs_raw_parallel
    assert {"raw_copy_one_rows_per_s", "raw_copy_parallel_rows_per_s", "meets_target"} <= set(last)
    assert any("raw binary COPY, 1 connection" in line for line in lines)
    # End to end into DuckDB, through the first run's own path.
    assert last["store_rows_per_s"] > 0
    assert last["ratio_store_vs_arrow"] == result.ratio_store_vs_arrow
    assert {"store_client_cpu_s", "meets_target_end_to_end"} <= set(last)
    assert any("end to end into DuckDB" in line for line in lines)
    # The CPU budget: where the CPU goes and the rate it allows on these cores.
    assert last["end_to_end_cpu_per_million_s"] > 0
    assert last["cpu_ceiling_rows_per_s"] > 0
    assert last["target_reachable"] == (last["cpu_ceiling_rows_per_s"] >= 1_000_000)
    budget = next(line for line in lines if line.startswith("CPU per 1M rows end to end"))
    assert ("out of reach" in budget) != last["target_reachable"]
