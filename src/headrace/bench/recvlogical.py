"""The benchmarks' peer: ``pg_recvlogical`` draining a slot into /dev/null.

PostgreSQL's own C client, receiving exactly what headrace's change source
asks for (the same :class:`StreamOptions`), is the floor that receiving the
changes costs whatever is done with them (``bench cdc``, ``bench pipeline
--backlog``).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from headrace.bench.process_cpu import waited_children_cpu_seconds
from headrace.errors import format_lsn
from headrace.source.postgres.replication import StreamOptions, quote_ident


@dataclass(frozen=True)
class PeerDrain:
    """One drain by ``pg_recvlogical``."""

    seconds: float
    cpu_seconds: float
    """pg_recvlogical's own CPU (user + system)."""


def recvlogical_options(options: StreamOptions) -> list[str]:
    """``options`` as pg_recvlogical's ``--option NAME=VALUE`` arguments."""
    pairs = [
        f"proto_version={options.proto_version}",
        "publication_names=" + ",".join(quote_ident(p) for p in options.publications),
    ]
    pairs += [
        f"{name}=true"
        for name, wanted in (
            ("messages", options.messages),
            ("streaming", options.streaming),
            ("binary", options.binary),
        )
        if wanted
    ]
    return [arg for pair in pairs for arg in ("--option", pair)]


def drain_with_pg_recvlogical(
    bindir: Path, dsn: str, slot: str, end_lsn: int, options: StreamOptions
) -> PeerDrain:
    """Run ``pg_recvlogical`` (from ``bindir``) on ``slot`` up to ``end_lsn``, writing to
    /dev/null; its wall time and CPU."""
    command = [
        str(bindir / "pg_recvlogical"),
        *("--dbname", dsn, "--slot", slot, "--start", "--no-loop"),
        *("--endpos", format_lsn(end_lsn), "--file", "/dev/null"),
        *recvlogical_options(options),
    ]
    cpu = waited_children_cpu_seconds()
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return PeerDrain(time.perf_counter() - started, waited_children_cpu_seconds() - cpu)
