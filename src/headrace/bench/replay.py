"""``headrace bench replay DIR``: apply recorded batches again, timing every statement.

A recording (:mod:`headrace.run.recorder`) holds a copy of the store and the
batches a live run applied. Each replay copies the store, opens an
:class:`~headrace.engine.engine.Engine` on it and applies the batches in
order, with the writer connection wrapped so every statement is timed. The
first ``skip`` batches of each replay are warm-up (caches, first compactions)
and not counted; between batches the engine's maintenance runs as in a live
run (timed separately, since it is not on the freshness path).

The peer is the live run itself: a replay's ms per apply is the writer's
share of the freshness a benchmark measured, without PostgreSQL, the
generator and the serving competing for the same cores.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.table import Table

from headrace.engine.engine import Engine
from headrace.pipeline.model import PipelineConfig
from headrace.run.allocator import arrow_allocator
from headrace.run.recorder import STORE_FILE, load_recording, read_batch
from headrace.source.changes import ChangeBatch
from headrace.store.duckdb.prepared import prepared_text
from headrace.store.duckdb.store import DuckDBStore

_SPACES = re.compile(r"\s+")
_INTEGER_LIST = re.compile(r"IN \(-?\d+(?:, -?\d+)*\)")


class _TimedConnection:
    """Forwards everything to a DuckDB connection; times ``execute`` per statement text."""

    def __init__(self, con: duckdb.DuckDBPyConnection, timings: dict[str, list[float]]) -> None:
        self._con = con
        self._timings = timings

    def execute(self, query: str, parameters: object = None) -> Any:
        started = time.perf_counter()
        try:
            if parameters is None:
                return self._con.execute(query)
            return self._con.execute(query, parameters)
        finally:
            ms = (time.perf_counter() - started) * 1000  # before the labelling's own time
            text = prepared_text(self, query) or query  # type: ignore[arg-type]
            self._timings[_label(text)].append(ms)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _label(query: str) -> str:
    """A statement's identity across batches: its text, whitespace folded, lists of
    integer constants (a key index's lookup, :mod:`headrace.engine.key_index`) as
    ``(…)``, cut short."""
    return _INTEGER_LIST.sub("IN (…)", _SPACES.sub(" ", query)).strip()[:110]


@dataclass
class ReplayResult:
    """Figures of one ``bench replay`` (the JSON line)."""

    recording: str
    batches: int = 0
    changes_per_batch: float = 0.0
    apply_ms_p50: float = 0.0
    apply_ms_mean: float = 0.0
    apply_ms_by_replay: list[float] = field(default_factory=list)
    statements_per_apply: float = 0.0
    statement_ms_per_apply: float = 0.0
    """Mean ms per apply inside the timed statements (``execute``); the rest of
    ``apply_ms_mean`` is Python, Arrow and the other DuckDB calls (register, fetch)."""
    maintain_ms_per_batch: float = 0.0
    changes_per_s: float = 0.0
    apply_cpu_us_per_change: float = 0.0
    """CPU of the whole process (the writer thread and DuckDB's workers) per change while
    applying, in µs: the writer's part of a change's cost, to set beside the live
    benchmarks' ``cpu_us_per_change`` (the live run also receives and decodes)."""
    maintain_cpu_us_per_change: float = 0.0
    """The same for the maintenance between batches (compaction, reserve refills)."""
    min_max_mirror_reads: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per min/max rollup, in one replay of all batches (every replay does the same):
    batches that recomputed groups from the mirror, groups refilled between batches."""
    top: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _OneReplay:
    """What one replay measured over its counted batches."""

    applies: list[float] = field(default_factory=list)
    """ms of wall time per apply."""
    maintain_ms: float = 0.0
    apply_cpu_s: float = 0.0
    maintain_cpu_s: float = 0.0
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    reads: dict[str, dict[str, int]] = field(default_factory=dict)


def _replay_once(
    directory: Path,
    config: PipelineConfig,
    batches: list[ChangeBatch],
    skip: int,
    workdir: Path,
) -> _OneReplay:
    copy = workdir / "replay.duckdb"
    for leftover in (copy, Path(f"{copy}.wal")):
        leftover.unlink(missing_ok=True)
    shutil.copyfile(directory / STORE_FILE, copy)
    store = DuckDBStore(copy)
    store.set_threads(config.store.streaming_threads)  # as the live run streamed
    one = _OneReplay()
    try:
        engine = Engine(config, store)
        plain = store._con
        # One wrapper for the replay: the statements prepared through it (see
        # headrace.store.duckdb.prepared) are kept per connection object.
        timed = _TimedConnection(plain, one.timings)
        for index, batch in enumerate(batches):
            counted = index >= skip
            store._con = timed if counted else plain  # type: ignore[assignment]
            # process_time: every thread of the process, DuckDB's workers included.
            cpu, started = time.process_time(), time.perf_counter()
            engine.apply(batch)
            if counted:
                one.applies.append((time.perf_counter() - started) * 1000)
                one.apply_cpu_s += time.process_time() - cpu
            store._con = plain
            cpu, started = time.process_time(), time.perf_counter()
            engine.maintain()
            if counted:
                one.maintain_ms += (time.perf_counter() - started) * 1000
                one.maintain_cpu_s += time.process_time() - cpu
        one.reads = {name: asdict(count) for name, count in engine.mirror_reads().items()}
    finally:
        store.close()
    return one


def run(
    directory: Path,
    *,
    repeat: int = 3,
    top: int = 15,
    skip: int = 2,
    console: Console | None = None,
) -> ReplayResult:
    """Replay the recording ``repeat`` times (module docstring) and print the figures."""
    out = console or Console(highlight=False)
    config, paths = load_recording(directory)
    batches = [read_batch(path) for path in paths]
    skip = min(skip, max(0, len(batches) - 1))
    counted = batches[skip:]
    changes = sum(batch.num_changes for batch in counted)
    result = ReplayResult(recording=str(directory), batches=len(counted))
    result.changes_per_batch = round(changes / len(counted), 1)
    out.print(
        f"replaying {len(batches)} batches ({skip} warm-up), "
        f"{result.changes_per_batch:,.0f} changes per counted batch, {repeat} times"
    )
    per_replay: list[float] = []
    all_applies: list[float] = []
    maintain_ms = apply_cpu_s = maintain_cpu_s = 0.0
    timings: dict[str, list[float]] = defaultdict(list)
    # The allocator `headrace run` uses (headrace.run.allocator).
    with arrow_allocator(), tempfile.TemporaryDirectory(prefix="hr-replay-") as tmp:
        for number in range(repeat):
            one = _replay_once(directory, config, batches, skip, Path(tmp))
            result.min_max_mirror_reads = one.reads
            per_replay.append(statistics.median(one.applies))
            all_applies.extend(one.applies)
            maintain_ms += one.maintain_ms
            apply_cpu_s += one.apply_cpu_s
            maintain_cpu_s += one.maintain_cpu_s
            for label, values in one.timings.items():
                timings[label].extend(values)
            out.print(
                f"  replay {number + 1}: median {per_replay[-1]:.1f} ms per apply, "
                f"total {sum(one.applies):,.0f} ms, CPU {one.apply_cpu_s:.2f} s"
            )
    applies_total = len(all_applies)
    result.apply_ms_by_replay = [round(v, 2) for v in per_replay]
    result.apply_ms_p50 = round(statistics.median(per_replay), 2)
    result.apply_ms_mean = round(statistics.fmean(all_applies), 2)
    result.statements_per_apply = round(sum(len(v) for v in timings.values()) / applies_total, 2)
    result.statement_ms_per_apply = round(sum(sum(v) for v in timings.values()) / applies_total, 2)
    result.maintain_ms_per_batch = round(maintain_ms / applies_total, 2)
    result.changes_per_s = round(changes * repeat / (sum(all_applies) / 1000), 1)
    result.apply_cpu_us_per_change = round(apply_cpu_s / max(changes * repeat, 1) * 1e6, 2)
    result.maintain_cpu_us_per_change = round(maintain_cpu_s / max(changes * repeat, 1) * 1e6, 2)
    ranked = sorted(timings.items(), key=lambda kv: -sum(kv[1]))
    table = Table(title="costliest statements (ms per apply)")
    table.add_column("ms", justify="right")
    table.add_column("runs/apply", justify="right")
    table.add_column("statement")
    for label, values in ranked[:top]:
        per_apply = sum(values) / applies_total
        result.top.append(
            {
                "ms_per_apply": round(per_apply, 2),
                "runs_per_apply": round(len(values) / applies_total, 2),
                "statement": label,
            }
        )
        table.add_row(f"{per_apply:.2f}", f"{len(values) / applies_total:.2f}", label)
    if top:
        out.print(table)
    out.print(
        f"apply: median {result.apply_ms_p50} ms (replays {result.apply_ms_by_replay}), "
        f"{result.statements_per_apply} statements per apply taking "
        f"{result.statement_ms_per_apply} of {result.apply_ms_mean} ms (mean), "
        f"{result.changes_per_s:,.0f} changes/s while applying; "
        f"maintenance {result.maintain_ms_per_batch} ms per batch; CPU per change "
        f"{result.apply_cpu_us_per_change} µs applying + {result.maintain_cpu_us_per_change} µs "
        "maintaining (every thread of the process)"
    )
    for name, reads in result.min_max_mirror_reads.items():
        out.print(
            f"min/max of {name}: the mirror read in {reads['batches']:,} batches, "
            f"{reads['groups_refilled']:,} groups refilled from it between batches"
        )
    print(json.dumps(result.__dict__), flush=True)
    return result
