"""What a lane evaluator records with the lane's position, to restart from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RuleSaved:
    """One rule's record: its watermark (µs) and incidents' last-seen times (µs by key).

    From :meth:`take_saved` only the incidents changed since the previous call; from the
    lane's store, all of them.
    """

    watermark_us: int | None
    last_seen: dict[str, int] = field(default_factory=dict)
    state: list[list[Any]] | None = None
    """Rule state the mirrors cannot rebuild (account takeover's risky logins), as JSON
    rows; from :meth:`take_saved` only when it changed (None: unchanged)."""
