"""What ``headrace demo`` shows: setup steps, then where to look and live figures.

On a terminal the live figures are a rich live panel refreshed every second;
elsewhere (a pipe, CI, a test) the same facts are printed once as plain
``name: value`` lines and the figures as one line every few seconds, so the
output can be read by a program.

:class:`DemoDisplay` is also the run loop's display (it receives the status
document about once a second and the snapshot's progress).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from headrace.errors import format_lsn
from headrace.run.console import RunDisplay
from headrace.source.postgres.snapshot_progress import TableProgress

PLAIN_EVERY_S = 5.0
"""Not on a terminal: one line of live figures this often."""


@dataclass(frozen=True)
class DemoFacts:
    """What is running and where to look (known once setup is done)."""

    url: str
    dsn: str
    postgres_version: str
    cluster_dir: Path
    workdir: Path
    rate: float
    seed: int
    admin: str
    password: str
    history_rows: int
    dashboard: str

    def links(self) -> list[tuple[str, str]]:
        """(what, where) of every place to look."""
        return [
            ("dashboard", f"{self.url}/dashboard/{self.dashboard}"),
            ("SQL editor", f"{self.url}/sql"),
            ("API", f"{self.url}/api/openapi.json"),
            ("metrics", f"{self.url}/metrics"),
            ("health", f"{self.url}/health"),
            ("psql", f'psql "{self.dsn}"'),
        ]


@dataclass
class LiveFigures:
    """One sample of the live figures."""

    at: float = field(default_factory=time.monotonic)
    transactions: int = 0
    generated_changes: int = 0
    scenarios: dict[str, int] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)
    """The pipeline's latest status document (see :mod:`headrace.run.status`)."""
    position: int | None = None
    alerts_by_rule: dict[str, int] | None = None


def _ms(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


class _HistoryProgress:
    """The history loader's stages as lines."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def stage(self, name: str, total: int) -> None:
        self.console.print(f"  history: {name}", style="dim", highlight=False)

    def advance(self, units: int) -> None:
        pass


class DemoDisplay(RunDisplay):
    """Setup steps, the run loop's progress, and the live view (see module docstring)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console, live=console.is_terminal)
        self.facts: DemoFacts | None = None
        self.figures = LiveFigures()
        self.document: dict[str, Any] = {}
        self._previous: LiveFigures | None = None
        self._rates: tuple[float, float] = (0.0, 0.0)
        self._view: Live | None = None
        self._printed_at = 0.0

    # -- setup -------------------------------------------------------------------

    def step(self, text: str) -> None:
        """A setup step begins (or a result of one)."""
        self.console.print(f"[green]>[/green] {text}", highlight=False, soft_wrap=True)

    def history_progress(self) -> _HistoryProgress:
        """Where the history loader reports its stages."""
        return _HistoryProgress(self.console)

    # -- the run loop's display ----------------------------------------------------

    def snapshot_progress(self, progress: TableProgress) -> None:
        if self.live:
            super().snapshot_progress(progress)

    def update(self, document: dict[str, Any]) -> None:
        """The pipeline's status (status thread, about once a second)."""
        self.document = document

    def streaming_started(self) -> None:
        """The demo's own live view replaces the run loop's line."""

    # -- the live view ----------------------------------------------------------------

    @contextlib.contextmanager
    def live_view(self) -> Iterator[None]:
        """Show the facts, then the live figures until the block ends."""
        facts = self.facts
        if facts is not None:
            self._print_facts(facts)
        if self.live:
            self._view = Live(
                self._render(), console=self.console, refresh_per_second=2, transient=False
            )
            self._view.start()
        try:
            yield
        finally:
            if self._view is not None:
                self._view.stop()
                self._view = None

    def refresh(self) -> None:
        """Take the latest figures into account and redraw (or print a line)."""
        current, previous = self.figures, self._previous
        if previous is not None and current.at > previous.at:
            span = current.at - previous.at
            self._rates = (
                (current.transactions - previous.transactions) / span,
                (current.generated_changes - previous.generated_changes) / span,
            )
        self._previous = current
        if self._view is not None:
            self._view.update(self._render())
        elif time.monotonic() - self._printed_at >= PLAIN_EVERY_S:
            self._printed_at = time.monotonic()
            self.console.print(self.summary(), highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._view is not None:
            self._view.stop()
            self._view = None
        super().close()

    # -- rendering ----------------------------------------------------------------------

    def _print_facts(self, facts: DemoFacts) -> None:
        def print_(text: str, **options: Any) -> None:
            self.console.print(text, soft_wrap=True, **options)

        print_("")
        print_(
            "[bold]headrace demo[/bold]: the reference fintech deployment, live", highlight=False
        )
        print_("running:", style="bold")
        print_(
            f"  postgres: PostgreSQL {facts.postgres_version}, a throwaway cluster in "
            f"{facts.cluster_dir} (stopped and removed on exit)",
            highlight=False,
        )
        print_(
            f"  workload: about {facts.rate:,.0f} transactions/s, seed "
            f"{facts.seed}, labelled fraud scenarios injected; {facts.history_rows:,} rows of "
            "history before it",
            highlight=False,
        )
        print_(
            "  pipeline: snapshot, then the pgoutput stream -> engine (rollups at 5m/1h/1d, "
            f"rules, scores) -> DuckDB {facts.workdir / 'bank.duckdb'}",
            highlight=False,
        )
        print_(f"  server: {facts.url}", highlight=False)
        print_(f"  log: {facts.workdir / 'demo.log'}", highlight=False)
        print_("where to look:", style="bold")
        for what, where in facts.links():
            print_(f"  {what}: {where}", highlight=False)
        print_(
            f"  login: {facts.admin} / [bold]{facts.password}[/bold]  (one-time password: "
            "shown only now, stored only as a hash)",
            highlight=False,
        )
        print_("Ctrl-C stops everything.", style="dim")

    def summary(self) -> str:
        """The live figures as one line."""
        figures, document = self.figures, self.figures.document
        freshness = document.get("freshness_ms") or {}
        alerts = figures.alerts_by_rule
        alert_text = (
            ", ".join(f"{rule} {n}" for rule, n in sorted(alerts.items())) or "none yet"
            if alerts is not None
            else "-"
        )
        position = format_lsn(figures.position) if figures.position is not None else "-"
        return (
            f"live: workload {self._rates[0]:,.0f} txn/s {self._rates[1]:,.0f} changes/s; "
            f"pipeline {document.get('phase', '-')} {document.get('changes_per_s', 0):,.0f} "
            f"changes/s, freshness p50 {_ms(freshness.get('p50'))} p99 "
            f"{_ms(freshness.get('p99'))}, lag {_ms(document.get('lag_ms'))}, position "
            f"{position}; alerts by rule: {alert_text}; scenarios injected "
            f"{sum(figures.scenarios.values())}"
        )

    def _render(self) -> RenderableType:
        figures, document = self.figures, self.figures.document
        freshness = document.get("freshness_ms") or {}
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row(
            "workload",
            f"{self._rates[0]:,.0f} transactions/s, {self._rates[1]:,.0f} row changes/s "
            f"({figures.transactions:,} transactions so far)",
        )
        table.add_row(
            "pipeline",
            f"{document.get('phase', '-')}: {document.get('changes_per_s', 0):,.0f} changes/s, "
            f"{document.get('batches_per_s', 0):,.1f} batches/s",
        )
        table.add_row(
            "freshness",
            f"p50 {_ms(freshness.get('p50'))}, p99 {_ms(freshness.get('p99'))} "
            f"(commit in PostgreSQL -> visible in the store); lag {_ms(document.get('lag_ms'))}",
        )
        position = format_lsn(figures.position) if figures.position is not None else "-"
        table.add_row("position", position)
        table.add_row("alerts by rule", self._alerts(figures))
        scenarios = ", ".join(f"{k} {v}" for k, v in sorted(figures.scenarios.items()))
        table.add_row("injected", scenarios or "no fraud scenario yet")
        lines: list[RenderableType] = [table]
        if document.get("error"):
            lines.append(Text(f"error: {document['error']}", style="red"))
        return Panel(Group(*lines), title="live", subtitle="Ctrl-C stops everything")

    @staticmethod
    def _alerts(figures: LiveFigures) -> str:
        alerts = figures.alerts_by_rule
        if alerts is None:
            return "(no alerts table yet)"
        if not alerts:
            return "none yet"
        return ", ".join(f"{rule} {n}" for rule, n in sorted(alerts.items()))
