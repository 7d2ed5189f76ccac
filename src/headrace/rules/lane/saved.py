"""What a lane evaluator records with the lane's position, to restart from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

StateRows = list[list[Any]]
"""Rule state as JSON rows."""


@dataclass(frozen=True)
class RuleSaved:
    """One rule's record: its watermark (µs) and incidents' last-seen times (µs by key).

    From :meth:`take_saved` only the incidents changed since the previous call; from the
    lane's store, all of them.
    """

    watermark_us: int | None
    last_seen: dict[str, int] = field(default_factory=dict)
    state: StateRows | Callable[[], StateRows] | None = None
    """Rule state the mirrors cannot rebuild (account takeover's risky logins), as JSON
    rows; from :meth:`take_saved` only when it changed (None: unchanged), and then as a
    function building the rows of the evaluator's state *when called*: the lane takes a
    record after every evaluation but commits one every few, so the rows are built only
    for the commit (the newest state then, which is the newest record's)."""

    def state_rows(self) -> StateRows | None:
        """:attr:`state` as rows, built now when it is a function."""
        return self.state() if callable(self.state) else self.state
