"""``headrace status`` on a terminal: a status document (:mod:`headrace.run.status`) as
tables, and the one-line summary shown while streaming."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"  # pragma: no cover - loop always returns


def _ms(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    if value == float("inf"):
        return "> 10 min"
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


def _when(text: object) -> str:
    if not isinstance(text, str):
        return "-"
    return text.replace("T", " ").split(".")[0].removesuffix("+00:00")


def render_status(document: dict[str, Any], console: Console) -> None:
    """Print a status document as a header and a table per table and rollup."""
    running = document.get("running")
    phase = document.get("phase", "?")
    head = f"[bold]{document.get('store')}[/bold]  phase [bold]{phase}[/bold]"
    if running and document.get("pid"):
        head += f"  (pid {document['pid']})"
    console.print(head)
    nothing = not (
        document.get("tables")
        or document.get("alert_deliveries")
        or (document.get("dead_letters") or {}).get("count")
    )
    if phase == "empty" and not running and nothing:
        console.print(
            "nothing loaded yet: `headrace run --config FILE` snapshots the tables into this "
            "store, then streams"
        )
        return
    line = [
        f"position {document.get('position_lsn') or '-'}",
        f"last commit {_when(document.get('position_commit_ts'))}",
    ]
    if running:
        freshness = document.get("freshness_ms") or {}
        line += [
            f"lag {_ms(document.get('lag_ms'))} / {_bytes(document.get('lag_bytes'))}",
            f"{document.get('changes_per_s', 0):,.0f} changes/s",
            f"{document.get('batches_per_s', 0):,.1f} batches/s",
            f"freshness p50 {_ms(freshness.get('p50'))} p99 {_ms(freshness.get('p99'))}",
            f"writer busy {_busy(document.get('writer_busy'))}",
        ]
    console.print("  ".join(line))
    if running:
        _render_running(document, console)
    dead = document.get("dead_letters") or {}
    if dead.get("count"):
        newest = dead.get("newest") or {}
        console.print(
            f"[red]dead letters: {dead['count']:,}[/red] (changes set aside, not applied); "
            f"newest: {newest.get('table')} at {newest.get('lsn')}: {newest.get('reason')}  "
            f"-> {_DEAD_LETTERS_HINT}"
        )
    lossy = document.get("lossy_values") or []
    if lossy:
        kinds = "; ".join(f"{v['type']}: {v['issue']} ({v['count']:,})" for v in lossy)
        console.print(
            f"[yellow]lossy values: {sum(v['count'] for v in lossy):,}[/yellow] "
            f"(not kept as PostgreSQL had them): {kinds}"
        )
    if document.get("error"):
        console.print(f"[red]error: {document['error']}[/red]")
    snapshot = document.get("snapshot")
    if snapshot and not snapshot.get("finished"):
        console.print(
            f"snapshot: {snapshot['rows']:,} rows in {snapshot['seconds']:.1f} s "
            f"({snapshot['rows_per_s']:,} rows/s)"
        )
    table = Table(title="tables", title_justify="left")
    for column in ("table", "rows", "last commit", "lag ms", "lag WAL", "changes/s", "batches/s"):
        table.add_column(
            column,
            justify="left" if column in ("table", "last commit") else "right",
            no_wrap=column == "table",
        )
    for row in document.get("tables", []):
        state = row.get("state", "active")
        name = row["name"] + ("" if state == "active" else f" ({state})")
        if row.get("key_indexed"):
            name += " (key indexed)"
        table.add_row(
            name,
            f"{row['rows']:,}",
            _when(row.get("last_commit_ts")),
            f"{row.get('lag_ms', 0):,.0f}" if running else "-",
            _bytes(row.get("lag_bytes")) if running else "-",
            f"{row.get('changes_per_s', 0):,.0f}" if running else "-",
            f"{row.get('batches_per_s', 0):,.1f}" if running else "-",
        )
    console.print(table)
    _render_rollups(document.get("rollups", []), console)
    _render_deliveries(document.get("alert_deliveries") or [], console)


def _render_rollups(rollups: list[dict[str, Any]], console: Console) -> None:
    """A table of the rollups' states (nothing when there are none)."""
    if not rollups:
        return
    listing = Table(title="rollups", title_justify="left")
    listing.add_column("rollup")
    listing.add_column("state")
    reads = any("min_max_mirror_reads" in rollup for rollup in rollups)
    if reads:
        listing.add_column("min/max from the mirror")
    listing.add_column("reason")
    for rollup in rollups:
        cells = [rollup["name"], rollup["state"]]
        if reads:
            cells.append(_mirror_reads(rollup.get("min_max_mirror_reads")))
        listing.add_row(*cells, rollup.get("reason") or "")
    console.print(listing)


def _mirror_reads(reads: dict[str, int] | None) -> str:
    if reads is None:
        return ""
    return f"{reads['batches']:,} batches, {reads['groups_refilled']:,} groups refilled"


def _render_deliveries(sinks: list[dict[str, Any]], console: Console) -> None:
    """A table of alert deliveries per sink (nothing when no sink has any)."""
    if not sinks:
        return
    table = Table(title="alert deliveries", title_justify="left")
    for column in ("sink", "delivered", "pending", "failed", "last attempt", "last failure"):
        table.add_column(
            column, justify="right" if column in ("delivered", "pending", "failed") else "left"
        )
    for sink in sinks:
        failed = int(sink.get("failed") or 0)
        table.add_row(
            sink["sink"],
            f"{sink.get('delivered', 0):,}",
            f"{sink.get('pending', 0):,}",
            f"[red]{failed:,}[/red]" if failed else "0",
            _when(sink.get("last_attempt_at")),
            sink.get("last_failed_error") or "",
        )
    console.print(table)


def _render_running(document: dict[str, Any], console: Console) -> None:
    """The lines only a running pipeline has: a large transaction, the rules lane, the
    store's checkpoints."""
    applying = document.get("applying")
    if applying:
        console.print(f"applying {_pieces(applying)}")
    lane = document.get("rules_lane")
    if lane:
        lane_freshness = lane.get("freshness_ms") or {}
        console.print(
            f"rules lane ({', '.join(lane.get('rules', []))}): {lane.get('alerts', 0):,} alerts, "
            f"{lane.get('commits', 0):,} commits, recorded p50 {_ms(lane_freshness.get('p50'))} "
            f"p99 {_ms(lane_freshness.get('p99'))} after the source's commit"
            + ("  [red]failed[/red]" if lane.get("failed") else "")
        )
    checkpoints = document.get("store_checkpoints")
    if checkpoints and checkpoints.get("count"):
        console.print(
            f"store: WAL {_bytes(document.get('store_wal_bytes'))}; {checkpoints['count']:,} "
            f"checkpoints, {checkpoints['seconds']:.1f} s in all, longest "
            f"{_ms(checkpoints['longest_s'] * 1000)}"
        )


def _pieces(applying: dict[str, Any]) -> str:
    share = applying["applied"] / applying["changes"] if applying.get("changes") else 0.0
    return (
        f"a large transaction: {applying['applied']:,} of {applying['changes']:,} changes "
        f"({share:.0%}, {applying['pieces']:,} pieces) in {applying['seconds']:.0f} s, "
        "visible at its commit"
    )


def summary_line(document: dict[str, Any]) -> str:
    """The one-line live summary shown on a terminal while streaming."""
    freshness = document.get("freshness_ms") or {}
    queue = document.get("queue") or {}
    applying = document.get("applying")
    if applying:
        return f"{document.get('phase')}  applying {_pieces(applying)}"
    return (
        f"{document.get('phase')}  {document.get('changes_per_s', 0):>9,.0f} changes/s  "
        f"{document.get('batches_per_s', 0):5.1f} batches/s  "
        f"freshness p50 {_ms(freshness.get('p50'))} p99 {_ms(freshness.get('p99'))}  "
        f"busy {_busy(document.get('writer_busy'))}  "
        f"lag {_ms(document.get('lag_ms'))} / {_bytes(document.get('lag_bytes'))}  "
        f"queue {queue.get('batches', 0)}/{queue.get('capacity', 0)}  "
        f"at {document.get('position_lsn') or '-'}"
    )


_DEAD_LETTERS_HINT = "the rows and payloads are in the store's headrace.dead_letters table"


def _busy(share: object) -> str:
    """The writer's busy share as a percentage; ``-`` before the first window."""
    return f"{float(share):.0%}" if isinstance(share, int | float) else "-"
