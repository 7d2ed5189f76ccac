"""``headrace bench fraud``: the six fraud rules on the live fintech workload, scored.

On a throwaway cluster:

1. The reference deployment's schema and a month of history are loaded
   (ending a while in the past, so the simulated clock of the live workload
   never runs ahead of the wall clock: rules judge event time).
2. ``headrace run`` starts as its own process with the reference
   deployment's pipeline (rollups, six rules, health score, metric alerts),
   its alerts going to a **local webhook receiver** (HMAC-signed).
3. A generator *process* writes the fintech workload with labelled fraud
   scenarios at ``--rate`` transactions/s (wall clock) for ``--seconds``,
   with the simulated clock running ``--speed`` times faster than the wall
   clock (so multi-minute scenarios complete within the run, and the
   population stays inside its normal per-account envelope), then drains.
4. Once the store has caught up and the webhooks have stopped arriving,
   headrace is stopped, and alerts (from the store) are scored against the
   ground truth (``fraud_ground_truth``): per rule precision and recall
   (target >= 0.95 each, :mod:`.fraud_score`); detection latency from the
   commit of the completing change to the webhook's arrival, p50/p99
   (target p99 < 200 ms); the rollups' freshness over the same time (commit
   → visible in the store, from the run loop's histogram).

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from headrace.alerts.delivery import SUMMARY as DELIVERY_SUMMARY
from headrace.bench import fraud_workload
from headrace.bench.fraud_receiver import Received, WebhookReceiver
from headrace.bench.fraud_score import AlertSeen, Incident, percentile, score_rules
from headrace.bench.process_cpu import (
    ProcessCpu,
    describe_cores,
    describe_waits,
    load_cpu_share,
    load_wait_share,
    postgres_cpu,
)
from headrace.bench.run_process import RunProcess, checkpoints_between, describe_checkpoints
from headrace.bench.workload_process import WorkloadProcess, workload_deadline_s
from headrace.demo.config import FraudFamily
from headrace.demo.deployment import deployment_text, pipeline_part, replace_section
from headrace.pipeline.load import load_pipeline
from headrace.run.metrics import FreshnessHistogram
from headrace.sandbox.postgres import ThrowawayPostgres
from headrace.store.duckdb.connect import open_store

TARGET_PRECISION = 0.95
TARGET_RECALL = 0.95
TARGET_LATENCY_P99_MS = 200.0
SETTLE_S = 5.0
"""After the store caught up: stop when no webhook arrived for this long."""
RULES = tuple(family.value for family in FraudFamily)


@dataclass
class FraudBenchResult:
    """Every figure of one run (the last JSON line)."""

    rate_target: float
    seconds: float
    speed: float
    fraud_every: int
    customers: int
    history_rows: int = 0
    snapshot_seconds: float | None = None
    written: dict[str, Any] = field(default_factory=dict)
    transactions_per_s: float = 0.0
    catch_up_s: float | None = None
    scenarios: int = 0
    alerts_in_store: int = 0
    webhooks_received: int = 0
    webhook_duplicates: int = 0
    webhooks_unsigned: int = 0
    rules: dict[str, dict[str, object]] = field(default_factory=dict)
    min_precision: float | None = None
    min_recall: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_by_rule_p99_ms: dict[str, float | None] = field(default_factory=dict)
    engine_latency_p50_ms: float | None = None
    engine_latency_p99_ms: float | None = None
    delivery_latency_p50_ms: float | None = None
    """Alert committed (its batch's commit published) -> webhook answered, from the log."""
    delivery_latency_p99_ms: float | None = None
    freshness_p50_ms: float | None = None
    freshness_p99_ms: float | None = None
    freshness_max_ms: float | None = None
    lane_rules: list[str] = field(default_factory=list)
    """Rules evaluated in memory (``rules.in_memory``: the rules lane)."""
    lane_freshness_p50_ms: float | None = None
    """Per change: source commit -> the rules lane recorded it (alerts committed)."""
    lane_freshness_p99_ms: float | None = None
    lane_freshness_max_ms: float | None = None
    lane_work: dict[str, float] = field(default_factory=dict)
    """The lane's batches, commits, and seconds evaluating and committing, over the run."""
    store_checkpoints: dict[str, float] = field(default_factory=dict)
    """The store's checkpoints over the load and the catch-up (count, seconds in all,
    longest since the run started)."""
    collector: dict[str, Any] = field(default_factory=dict)
    """Python's garbage collector in headrace while streaming: collections per generation,
    total and longest pause (every thread stops), objects frozen at start-up."""
    headrace_cpu_cores: float | None = None
    """``cpu_cores["headrace"]`` (kept under its earlier name for readers of the JSON)."""
    cpu_cores: dict[str, float] = field(default_factory=dict)
    """Cores used over the load and the catch-up, by PostgreSQL (server, backends,
    walsender), the generator process and headrace: the machine's budget."""
    cpu_waits: dict[str, float] = field(default_factory=dict)
    """Seconds per second that PostgreSQL's and headrace's threads were runnable but waited
    for a CPU over the same window (more than the cores they used: every core was busy)."""
    meets_target: bool | None = None
    problems: list[str] = field(default_factory=list)


def _pipeline_file(dsn: str, store: Path, path: Path, webhook: str, secret: str) -> Path:
    """The reference deployment's pipeline, its alerts sent to ``webhook`` only."""
    text = pipeline_part(deployment_text(dsn, store))
    sink = (
        "sinks:\n"
        "  - name: bench\n"
        "    type: webhook\n"
        f"    url: {json.dumps(webhook)}\n"
        f"    secret: {json.dumps(secret)}\n"
        "    kinds: [fraud]\n"
        "    timeout: 5s\n"
        "    retry: {attempts: 3, backoff: 1s}\n"
    )
    path.write_text(replace_section(text, "sinks", sink))
    load_pipeline(path)  # fails here, clearly, if the deployment does not load
    return path


def run(
    rate: float = 5_000,
    seconds: float = 60.0,
    *,
    speed: float = 60.0,
    customers: int = 20_000,
    fraud_every: int = 1_000,
    seed: int = 1,
    record: Path | None = None,
    console: Console | None = None,
) -> FraudBenchResult:
    """Run the benchmark (see module docstring) and print its lines."""
    out = console or Console(highlight=False)
    result = FraudBenchResult(
        rate_target=rate,
        seconds=seconds,
        speed=speed,
        fraud_every=fraud_every,
        customers=customers,
    )
    secret = secrets.token_hex(16)
    with (
        ThrowawayPostgres() as cluster,
        tempfile.TemporaryDirectory(prefix="hr-bench-fraud-") as tmp,
        WebhookReceiver(secret) as receiver,
    ):
        out.print(f"loading a month of history for {customers:,} customers ...")
        dsn, anchor, result.history_rows = fraud_workload.bank_with_history(
            cluster, customers=customers, seed=seed, seconds=seconds, speed=speed
        )
        store = Path(tmp) / "bench.duckdb"
        config = _pipeline_file(dsn, store, Path(tmp) / "headrace.yaml", receiver.url, secret)
        extra = ("--batch-wait-ms", "20") + (("--record", str(record.resolve())) if record else ())
        headrace = RunProcess(config, store, Path(tmp) / "headrace.log", extra)
        try:
            _measure(
                result,
                headrace,
                receiver,
                postgres=postgres_cpu(cluster.datadir),
                dsn=dsn,
                anchor=anchor,
                seed=seed,
                out=out,
            )
        finally:
            code = headrace.stop()
            _delivery_figures(result, headrace.log_path)
            if code != 0:
                result.problems.append(f"headrace run exited with {code}")
                out.print(headrace.log_path.read_text()[-3000:], markup=False)
        _score(result, store, dsn, receiver.received(), out)
        result.webhook_duplicates = receiver.duplicates
    _judge(result)
    _print_table(result, out)
    out.print(json.dumps(asdict(result), default=str), markup=False, soft_wrap=True)
    return result


def _lane_figures(
    result: FraudBenchResult, done: dict[str, Any], before: FreshnessHistogram
) -> None:
    """The rules lane's freshness over the load, from ``headrace run``'s status."""
    lane = done.get("rules_lane") or {}
    if not lane:
        return
    result.lane_rules = list(lane.get("rules", []))
    freshness = FreshnessHistogram(lane.get("freshness_histogram")).since(before)
    result.lane_freshness_p50_ms = freshness.percentile(0.5)
    result.lane_freshness_p99_ms = freshness.percentile(0.99)
    result.lane_freshness_max_ms = freshness.percentile(1.0)
    result.lane_work = {
        name: lane[name]
        for name in ("batches", "evaluations", "commits", "evaluate_s", "commit_s")
        if name in lane
    }


def _measure(
    result: FraudBenchResult,
    headrace: RunProcess,
    receiver: WebhookReceiver,
    *,
    postgres: ProcessCpu,
    dsn: str,
    anchor: datetime,
    seed: int,
    out: Console,
) -> None:
    streaming = headrace.wait_for(lambda d: d.get("phase") == "streaming", 900, "the snapshot")
    snapshot = streaming.get("snapshot") or {}
    result.snapshot_seconds = snapshot.get("seconds")
    out.print(
        f"history {result.history_rows:,} rows; snapshot into the store in "
        f"{result.snapshot_seconds} s; streaming"
    )
    time.sleep(1.5)
    before = headrace.status()
    before_hist = FreshnessHistogram(before.get("freshness_histogram"))
    before_lane = FreshnessHistogram((before.get("rules_lane") or {}).get("freshness_histogram"))
    options = fraud_workload.options_for(
        dsn=dsn,
        rate=result.rate_target,
        speed=result.speed,
        seconds=result.seconds,
        anchor=anchor,
        customers=result.customers,
        seed=seed,
        fraud_every=result.fraud_every,
    )
    out.print(
        f"writing {result.rate_target:,.0f} transactions/s for {result.seconds:.0f} s "
        f"(simulated clock x{result.speed:g}), one fraud scenario per "
        f"{result.fraud_every:,} transactions ..."
    )
    share = load_cpu_share(postgres, headrace.cpu_seconds)
    waits = load_wait_share(postgres, headrace.wait_seconds)
    generator = WorkloadProcess("headrace.bench.fraud_workload", options)
    try:
        written = generator.wait(workload_deadline_s(result.seconds), headrace.status)
    finally:
        generator.stop()
    result.written = written
    result.transactions_per_s = float(written["transactions_per_s"])
    if written.get("envelope_breaches"):
        result.problems.append(
            f"{written['envelope_breaches']:,} normal transactions exceeded the per-account "
            "rate cap (the population is small for this rate and speed): velocity alerts on "
            "them are the generator's doing; use more --customers or a higher --speed"
        )
    load_end = time.monotonic()
    done = headrace.wait_for(
        lambda d: (d.get("position") or 0) >= int(written["end_lsn"]),
        900,
        "the store to catch up",
    )
    result.catch_up_s = round(time.monotonic() - load_end, 2)
    result.cpu_cores = share.stop()
    result.cpu_waits = waits.stop()
    result.headrace_cpu_cores = result.cpu_cores["headrace"]
    freshness = FreshnessHistogram(done.get("freshness_histogram")).since(before_hist)
    result.freshness_p50_ms = freshness.percentile(0.5)
    result.freshness_p99_ms = freshness.percentile(0.99)
    result.freshness_max_ms = freshness.percentile(1.0)
    _lane_figures(result, done, before_lane)
    result.collector = dict(done.get("collector") or {})
    result.store_checkpoints = checkpoints_between(before, done)
    quiet_since = time.monotonic()
    last = receiver.last_at
    deadline = time.monotonic() + 120
    while time.monotonic() - quiet_since < SETTLE_S and time.monotonic() < deadline:
        time.sleep(0.25)
        headrace.status()
        if receiver.last_at != last:
            last, quiet_since = receiver.last_at, time.monotonic()
    out.print(
        f"written: {written['transactions']:,} transactions ({result.transactions_per_s:,.0f}/s "
        f"while paced), {written['changes']:,} row changes, scenarios {written['scenarios']}; "
        f"store caught up {result.catch_up_s} s after the load"
    )
    out.print(describe_cores(result.cpu_cores))
    if result.cpu_waits:
        out.print(describe_waits(result.cpu_waits))


def _score(
    result: FraudBenchResult, store: Path, dsn: str, received: list[Received], out: Console
) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT scenario_id, expected_rule, account_id, started_at, ended_at "
            "FROM fraud_ground_truth"
        ).fetchall()
    incidents = [
        Incident(int(str(r[0])), str(r[1]), int(str(r[2])), _time(r[3]), _time(r[4])) for r in rows
    ]
    result.scenarios = len(incidents)
    alerts: list[AlertSeen] = []
    engine_latencies: list[float] = []
    if store.exists():
        con = open_store(store, read_only=True)
        try:
            tables = {
                str(r[0])
                for r in con.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'headrace'"
                ).fetchall()
            }
            if "alerts" in tables:
                for alert_id, rule, account, event_at, latency in con.execute(
                    "SELECT id, rule, account_id, event_at, latency_ms FROM headrace.alerts "
                    "WHERE kind = 'fraud' ORDER BY id"
                ).fetchall():
                    alerts.append(
                        AlertSeen(
                            int(alert_id),
                            str(rule),
                            None if account is None else int(account),
                            event_at,
                        )
                    )
                    if latency is not None:
                        engine_latencies.append(float(latency))
            else:
                result.problems.append("the store has no headrace.alerts table")
        finally:
            con.close()
    result.alerts_in_store = len(alerts)
    scores = score_rules(incidents, alerts, RULES)
    result.rules = {rule: score.as_dict() for rule, score in scores.items()}
    precisions = [s.precision for s in scores.values() if s.precision is not None]
    recalls = [s.recall for s in scores.values() if s.recall is not None]
    result.min_precision = min(precisions) if precisions else None
    result.min_recall = min(recalls) if recalls else None
    result.engine_latency_p50_ms = percentile(engine_latencies, 0.5)
    result.engine_latency_p99_ms = percentile(engine_latencies, 0.99)
    fraud = [r for r in received if r.document.get("kind") == "fraud"]
    result.webhooks_received = len(fraud)
    result.webhooks_unsigned = sum(1 for r in fraud if not r.signed)
    latencies: dict[str, list[float]] = {}
    for item in fraud:
        commit = item.document.get("commit_ts")
        if not commit:
            continue
        committed = datetime.fromisoformat(str(commit)).timestamp()
        latencies.setdefault(str(item.document.get("rule")), []).append(
            (item.received_at - committed) * 1000
        )
    every = [v for values in latencies.values() for v in values]
    result.latency_p50_ms = _round(percentile(every, 0.5))
    result.latency_p99_ms = _round(percentile(every, 0.99))
    result.latency_max_ms = _round(max(every) if every else None)
    result.latency_by_rule_p99_ms = {
        rule: _round(percentile(values, 0.99)) for rule, values in sorted(latencies.items())
    }
    if not fraud and alerts:
        result.problems.append(
            f"{len(alerts)} fraud alerts in the store but no webhook arrived: "
            "is alert delivery running in `headrace run`?"
        )
    elif len(fraud) < len(alerts):
        result.problems.append(f"{len(alerts) - len(fraud)} alerts were not delivered")
    out.print(
        f"alerts: {len(alerts):,} fraud alerts in the store, {len(fraud):,} received by the "
        f"webhook ({result.webhook_duplicates} copies, {result.webhooks_unsigned} badly signed); "
        f"{len(incidents):,} labelled scenarios"
    )


def _delivery_figures(result: FraudBenchResult, log_path: Path) -> None:
    """The delivery's own latency, from the summary ``headrace run`` logs at stop."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for match in DELIVERY_SUMMARY.finditer(text):
        if match["sink"] == "bench":
            result.delivery_latency_p50_ms = float(match["p50"])
            result.delivery_latency_p99_ms = float(match["p99"])


def _time(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"not a time: {value!r}")
    return value


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _judge(result: FraudBenchResult) -> None:
    checks = [
        result.min_precision is not None and result.min_precision >= TARGET_PRECISION,
        result.min_recall is not None and result.min_recall >= TARGET_RECALL,
        result.latency_p99_ms is not None and result.latency_p99_ms < TARGET_LATENCY_P99_MS,
        all(int(str(r.get("incidents") or 0)) > 0 for r in result.rules.values()),
    ]
    result.meets_target = all(checks) and not result.problems


def _print_table(result: FraudBenchResult, out: Console) -> None:
    table = Table(title="fraud rules against the labelled scenarios", title_justify="left")
    for column in ("rule", "scenarios", "detected", "recall", "alerts", "precision", "p99 ms"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for rule, score in result.rules.items():
        table.add_row(
            rule,
            str(score["incidents"]),
            str(score["detected"]),
            _fmt(score["recall"]),
            str(score["alerts"]),
            _fmt(score["precision"]),
            _fmt(result.latency_by_rule_p99_ms.get(rule)),
        )
    out.print(table)
    out.print(
        f"detection latency (commit -> webhook received): p50 {result.latency_p50_ms} ms, "
        f"p99 {result.latency_p99_ms} ms (target < {TARGET_LATENCY_P99_MS:.0f}); in the engine "
        f"(commit -> rules ran, the alert's detected_at; its batch commits later): p50 "
        f"{result.engine_latency_p50_ms} ms, p99 {result.engine_latency_p99_ms} ms; delivery "
        f"(alert committed -> webhook answered): p50 {result.delivery_latency_p50_ms} ms, "
        f"p99 {result.delivery_latency_p99_ms} ms"
    )
    out.print(
        f"rollup freshness meanwhile (commit -> visible): p50 {result.freshness_p50_ms} ms, "
        f"p99 {result.freshness_p99_ms} ms, max {result.freshness_max_ms} ms; headrace CPU "
        f"{result.headrace_cpu_cores} cores"
    )
    if result.lane_rules:
        out.print(
            f"rules lane ({', '.join(result.lane_rules)} in memory), every change from its "
            f"commit to evaluated (alerts committed): p50 {result.lane_freshness_p50_ms} ms, p99 "
            f"{result.lane_freshness_p99_ms} ms, max {result.lane_freshness_max_ms} ms; "
            f"{result.lane_work}"
        )
    if result.store_checkpoints:
        out.print(describe_checkpoints(result.store_checkpoints))
    if result.collector:
        out.print(
            f"garbage collector while streaming: {result.collector.get('collections')} "
            f"collections (young, middle, full), pauses {result.collector.get('pause_ms')} ms "
            f"in all, longest {result.collector.get('longest_pause_ms')} ms"
        )
    for problem in result.problems:
        out.print(f"[yellow]problem:[/yellow] {problem}")
    verdict = "meets" if result.meets_target else "misses"
    out.print(
        f"{verdict} the targets: precision and recall >= {TARGET_PRECISION} per rule, "
        f"latency p99 < {TARGET_LATENCY_P99_MS:.0f} ms"
    )


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value <= 1 else f"{value:,.1f}"
    return str(value)
