"""``headrace bench pipeline`` end to end, small: both modes' machinery, not their figures.

A real PostgreSQL, ``headrace run`` as a process, the generator process, and
(in the backlog mode) ``pg_recvlogical``: every part runs, every change
written is counted, the store equals PostgreSQL, and the last line printed is
the JSON result.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from headrace.bench.calibration import autogroup_enabled, describe_scheduling
from headrace.bench.pipeline import run
from headrace.bench.pipeline_workload import Mix


def test_live_mode_measures_freshness_of_every_change_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A delete-heavy mix: rollup groups lose values as often as they gain them.
    result = run(rate=2_000, seconds=3, base_rows=5_000, writers=2, mix=Mix.parse("40:20:40"))
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(asdict(result)))
    assert result.mode == "live"
    assert result.connection == "unix"
    assert result.backlog is None
    assert result.written_changes > 0
    assert result.mix == "40:20:40"
    assert result.python_loop_s > 0  # the machine's speed that day
    # How the kernel shares the cores, as the machine says it.
    assert result.sched_autogroup == autogroup_enabled()
    assert describe_scheduling(result.sched_autogroup) in " ".join(printed.split())
    assert sum(result.written_by_kind.values()) == result.written_changes
    assert result.written_by_kind["deletes"] > 0
    # The min/max rollup's figures, from the status file (0 or more: a small table).
    assert set(result.min_max_mirror_reads) == {"tx_merchant"}
    assert set(result.min_max_mirror_reads["tx_merchant"]) == {"batches", "groups_refilled"}
    assert result.mismatches == 0
    assert result.checked_views == 5
    assert result.freshness_p99_ms is not None
    assert result.freshness_p99_ms >= (result.freshness_p50_ms or 0) > 0
    assert result.store_transactions > 0
    # Each party's CPU per change written, and the line set against the cores' budget.
    assert set(result.cpu_us_per_change) == {"postgres", "generator", "headrace"}
    assert result.cpu_us_per_change["headrace"] > 0
    assert "CPU per change, in µs: postgres" in printed
    assert "per change at 2,000 changes/s" in printed
    assert result.meets_target is not None
    # Whether the generator wrote the rate asked for, and a warning when it did not.
    assert result.load_reached is (result.written_rate >= 2_000 * 0.995)
    assert ("could not produce the load" in printed) is not result.load_reached


def test_backlog_mode_times_the_drain_against_pg_recvlogical(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Over TCP, as to a server on another machine: both connection kinds are covered.
    result = run(rate=2_000, seconds=3, base_rows=5_000, writers=2, backlog=True, tcp=True)
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(asdict(result)))
    assert result.mode == "backlog"
    assert result.connection == "tcp"
    assert "headrace connects over TCP" in printed
    figures = result.backlog
    assert figures is not None
    assert figures.changes == result.written_changes > 0
    assert figures.written_by_kind == result.written_by_kind
    assert sum(result.written_by_kind.values()) == result.written_changes
    # Every change of the backlog reached the store, exactly.
    assert result.mismatches == 0
    assert result.checked_views == 5
    assert 0 < figures.start_s <= figures.drain_s
    assert figures.changes_per_s > 0
    assert figures.store_transactions > 0
    assert figures.peer_drain_s > 0
    assert figures.ratio_vs_pg_recvlogical > 0
    assert figures.capacity_vs_target == round(figures.changes_per_s / 100_000, 2)
    assert set(figures.cpu_cores) == {"postgres", "headrace"}
    assert set(figures.cpu_us_per_change) == {"postgres", "headrace"}
    assert figures.cpu_us_per_change["headrace"] > 0
    assert "pg_recvlogical" in figures.peer_cpu_cores
    # No freshness in this mode, so no verdict on the live target.
    assert result.freshness_p99_ms is None
    assert result.meets_target is None
    assert result.load_reached is None
    assert "capacity:" in printed
