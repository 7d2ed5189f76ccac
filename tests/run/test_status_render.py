"""`headrace status` in words: the store's checkpoints appear once there were some."""

from __future__ import annotations

import io

from rich.console import Console

from headrace.run.status import render_status


def _rendered(document: dict[str, object]) -> str:
    out = io.StringIO()
    render_status(document, Console(file=out, width=200))
    return out.getvalue()


def test_checkpoints_are_shown_while_running() -> None:
    document: dict[str, object] = {
        "store": "/data/store.duckdb",
        "phase": "streaming",
        "running": True,
        "pid": 42,
        "store_wal_bytes": 3 * 2**20,
        "store_checkpoints": {"count": 2, "seconds": 1.5, "longest_s": 0.95, "wal_bytes": 1},
    }
    text = _rendered(document)
    assert "store: WAL 3.0 MB; 2 checkpoints, 1.5 s in all, longest 950 ms" in text
    document["store_checkpoints"] = {"count": 0, "seconds": 0, "longest_s": 0, "wal_bytes": 0}
    assert "checkpoints" not in _rendered(document)
