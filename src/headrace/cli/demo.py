"""``headrace demo``: the reference fintech deployment (schema, live workload, history)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from headrace.demo.config import HistorySettings, PopulationSettings, WorkloadSettings
from headrace.errors import ConfigError, HeadraceError, SourceError

if TYPE_CHECKING:
    from headrace.demo.generator import Workload

demo_app = typer.Typer(
    name="demo",
    help="The reference fintech deployment: schema, live workload, history.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)

console = Console()
errors = Console(stderr=True)

DsnOption = Annotated[
    str,
    typer.Option("--dsn", envvar="HEADRACE_DSN", help="libpq connection string of the database."),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seeds every random choice.")]
CustomersOption = Annotated[
    int,
    typer.Option(
        "--customers",
        help="Customers to create (accounts are about 1.2x, cards 1.5x). "
        "For generate: only when the database has none yet.",
    ),
]
AnchorOption = Annotated[
    str | None,
    typer.Option(
        "--anchor",
        help="Simulated clock start (ISO 8601 with a zone, e.g. 2026-01-01T00:00Z); "
        "default: now. The only input not taken from the seed.",
    ),
]

T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run a command body; a HeadraceError becomes a message and exit code 1."""
    import psycopg  # noqa: PLC0415 - keeps --help fast

    try:
        try:
            return action()
        except psycopg.Error as exc:
            raise SourceError(
                f"the database refused the demo's work: {exc}".strip(),
                "see the PostgreSQL server log; the generator can simply be started again "
                "(it settles what an interrupted run left pending)",
            ) from exc
    except HeadraceError as exc:
        errors.print(f"[red]error:[/red] {exc.what}", highlight=False)
        if exc.fix:
            errors.print(f"  what to do: {exc.fix}", highlight=False)
        raise typer.Exit(1) from exc


def _anchor(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"not an ISO 8601 time: {text!r}", "write it like 2026-01-01T00:00Z"
        ) from exc
    if moment.tzinfo is None:
        raise ConfigError(f"the anchor {text!r} has no time zone", "add one, e.g. Z or +01:00")
    return moment


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set ``stop`` (the current tick finishes and commits)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@demo_app.callback()
def demo(
    ctx: typer.Context,
    *,
    rate: Annotated[
        float,
        typer.Option("--rate", help="Live transactions per second (steady)."),
    ] = 40.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds the history and the live workload.")
    ] = 1,
    port: Annotated[
        int, typer.Option("--port", help="Dashboard port on 127.0.0.1 (0: any free one).")
    ] = 8321,
    months: Annotated[int, typer.Option("--months", help="Months of history to load.")] = 1,
    customers: Annotated[
        int, typer.Option("--customers", help="Customers of the simulated bank.")
    ] = 10_000,
    duration: Annotated[
        float | None,
        typer.Option("--duration", help="Stop after this many seconds of live workload."),
    ] = None,
) -> None:
    """The reference fintech deployment, end to end (`make demo`).

    Without a sub-command: starts a throwaway PostgreSQL with the fintech
    schema, loads history, starts the live workload, runs the pipeline with
    the dashboard, and shows where to look and live figures. Ctrl-C stops
    everything and removes every temporary file. The sub-commands run one
    part against a database of your own.
    """
    if ctx.invoked_subcommand is not None:
        return

    def body() -> None:
        from headrace.demo.run_demo import DemoSettings, run_demo  # noqa: PLC0415 - fast --help

        run_demo(
            DemoSettings(
                rate=rate,
                seed=seed,
                port=port,
                months=months,
                customers=customers,
                duration=duration,
            ),
            console,
        )

    _run(body)


@demo_app.command("generate")
def generate(
    *,
    dsn: DsnOption,
    rate: Annotated[
        float,
        typer.Option(
            "--rate", help="New transactions per (simulated) second at the busiest hour of the day."
        ),
    ] = 500.0,
    seed: SeedOption = 1,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop after this many seconds.")
    ] = None,
    fraud_every: Annotated[
        int,
        typer.Option(
            "--fraud-every", help="One labelled fraud scenario per N transactions; 0: none."
        ),
    ] = 2_000,
    tick_ms: Annotated[
        int, typer.Option("--tick-ms", help="Simulated milliseconds per commit.")
    ] = 50,
    speed: Annotated[
        float,
        typer.Option(
            "--speed",
            help="Simulated seconds per wall-clock second (the write rate scales with it).",
        ),
    ] = 1.0,
    diurnal_amplitude: Annotated[
        float,
        typer.Option("--diurnal-amplitude", help="Depth of the daily rhythm, 0 (flat) to 1."),
    ] = 0.5,
    anchor: AnchorOption = None,
    customers: CustomersOption = 20_000,
) -> None:
    """Write a steady, deterministic fintech workload with labelled fraud scenarios.

    Creates the schema and a population when the database has none. Prints
    the achieved rate every second; Ctrl-C stops after the current commit.
    """

    def body() -> None:
        from headrace.demo.generator import Workload  # noqa: PLC0415 - keeps --help fast

        settings = WorkloadSettings(
            dsn=dsn,
            seed=seed,
            rate=rate,
            tick_ms=tick_ms,
            speed=speed,
            diurnal_amplitude=diurnal_amplitude,
            fraud_every=fraud_every,
            anchor=_anchor(anchor),
            population=PopulationSettings(customers=customers),
        )
        stop = threading.Event()
        with _stop_on_signals(stop), Workload(settings) as workload:
            console.print(
                f"generating from {workload.now:%Y-%m-%d %H:%M:%S} UTC (simulated), "
                f"{len(workload.population.accounts):,} accounts, rate {rate:,.0f} txn/s, "
                f"seed {seed}; Ctrl-C to stop",
                highlight=False,
            )
            meter = _RateMeter(workload)
            began = time.monotonic()
            workload.run(stop, duration=duration, on_tick=meter.tick)
            elapsed = max(time.monotonic() - began, 1e-9)
            stats = workload.stats
        scenarios = ", ".join(f"{k} {v}" for k, v in sorted(stats.scenarios.items())) or "none"
        console.print(
            f"stopped after {elapsed:.1f} s: {stats.transactions:,} transactions "
            f"({stats.transactions / elapsed:,.0f}/s), {stats.changes:,} row changes "
            f"({stats.changes / elapsed:,.0f}/s), {stats.commits:,} commits; "
            f"scenarios: {scenarios}",
            highlight=False,
        )
        if stats.envelope_breaches:
            console.print(
                f"[yellow]{stats.envelope_breaches:,} normal transactions exceeded the "
                "per-account rate cap: the population is small for this rate "
                "(more --customers or a lower --rate)[/yellow]"
            )

    _run(body)


class _RateMeter:
    """Prints the achieved rates once a second."""

    def __init__(self, workload: Workload) -> None:
        self._last = time.monotonic()
        self._start = self._last
        self._txn = workload.stats.transactions
        self._changes = workload.stats.changes
        self._commits = workload.stats.commits

    def tick(self, workload: Workload) -> None:
        now = time.monotonic()
        span = now - self._last
        if span < 1.0:
            return
        stats = workload.stats
        console.print(
            f"{now - self._start:7.1f} s  {(stats.transactions - self._txn) / span:8,.0f} txn/s  "
            f"{(stats.changes - self._changes) / span:9,.0f} changes/s  "
            f"{(stats.commits - self._commits) / span:5,.0f} commits/s  "
            f"behind {stats.behind_s * 1000:6,.0f} ms  "
            f"scenarios {sum(stats.scenarios.values()):,}",
            highlight=False,
        )
        self._last = now
        self._txn = stats.transactions
        self._changes = stats.changes
        self._commits = stats.commits


class _RichProgress:
    """Draws the history loader's stages as rich progress bars."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def stage(self, name: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[self._task].total)
        self._task = self._progress.add_task(name, total=total)

    def advance(self, units: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, units)


@demo_app.command("load-history")
def load_history_command(
    *,
    dsn: DsnOption,
    months: Annotated[int, typer.Option("--months", help="Months (of 30 days) of history.")] = 2,
    seed: SeedOption = 1,
    customers: CustomersOption = 10_000,
    replace: Annotated[
        bool, typer.Option("--replace", help="Empty the demo tables first.")
    ] = False,
    anchor: AnchorOption = None,
) -> None:
    """Bulk-load months of past data (COPY) into an empty demo database."""

    def body() -> None:
        from headrace.demo.history import load_history  # noqa: PLC0415 - keeps --help fast

        settings = HistorySettings(
            dsn=dsn,
            seed=seed,
            months=months,
            anchor=_anchor(anchor),
            replace=replace,
            population=PopulationSettings(customers=customers),
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            report = load_history(settings, _RichProgress(progress))
        rows = ", ".join(f"{name} {count:,}" for name, count in report.rows.items())
        console.print(
            f"loaded {months} months of history in {report.seconds:.1f} s: {rows}",
            highlight=False,
        )

    _run(body)


@demo_app.command("schema")
def schema_command(
    *,
    dsn: DsnOption,
    drop: Annotated[bool, typer.Option("--drop", help="Drop the demo tables instead.")] = False,
) -> None:
    """Create the demo schema (idempotent), or drop it."""

    def body() -> None:
        import psycopg  # noqa: PLC0415 - keeps --help fast

        from headrace.demo.schema import apply_schema, drop_schema  # noqa: PLC0415

        try:
            conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise SourceError(
                f"cannot connect to the demo database: {exc}".strip(),
                "check --dsn (a libpq connection string) and that PostgreSQL is running",
            ) from exc
        with conn:
            if drop:
                drop_schema(conn)
                console.print("dropped the demo tables")
            else:
                apply_schema(conn)
                console.print("the demo schema is in place")

    _run(body)
