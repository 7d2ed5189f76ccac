"""The benchmarks' CPU budget: PostgreSQL with its exited backends, a waited-for generator."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from headrace.bench.process_cpu import (
    CpuShare,
    ProcessCpu,
    cpu_per_change_us,
    describe_cores,
    describe_cost_per_change,
    describe_waits,
    describe_writer_thread,
    load_cpu_share,
    postgres_cpu,
    thread_schedstat,
    thread_wait_seconds,
    waited_children_cpu_seconds,
    writer_thread_share,
)
from headrace.sandbox.postgres import ThrowawayPostgres
from tests.conftest import PgDatabase

BUSY = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"


def test_postgres_cpu_counts_backends_that_exited(
    pg_cluster: ThrowawayPostgres, pg_db: PgDatabase
) -> None:
    meter = postgres_cpu(pg_cluster.datadir)
    before = meter.cpu_seconds()
    with pg_db.connect() as conn:  # its backend exits when the connection closes
        # Several times the 0.1 s asserted, and time for a loaded machine's postmaster
        # to reap the backend (seen failing once beside other test sessions).
        conn.execute(b"SELECT count(*) FROM generate_series(1, 8000000)").fetchall()
    deadline = time.monotonic() + 30
    while meter.cpu_seconds() - before < 0.1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the postmaster waits for the backend, then counts its CPU
    assert meter.cpu_seconds() - before >= 0.1


def test_a_waited_for_child_counts_and_the_share_is_in_cores(
    pg_cluster: ThrowawayPostgres,
) -> None:
    share = load_cpu_share(postgres_cpu(pg_cluster.datadir), lambda: 0.0)
    before = waited_children_cpu_seconds()
    subprocess.run([sys.executable, "-c", BUSY], check=True)
    assert waited_children_cpu_seconds() - before >= 0.25
    cores = share.stop()
    assert set(cores) == {"postgres", "generator", "headrace"}
    assert 0.0 < cores["generator"] <= 1.5
    assert cores["headrace"] == 0.0
    assert describe_cores(cores).startswith("CPU over the load, in cores of ")


def test_threads_waiting_for_a_cpu_are_counted() -> None:
    # One busy process more than the cores this test may use: someone always waits.
    busy = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"
    count = len(os.sched_getaffinity(0)) + 1
    children = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(count)]
    try:
        time.sleep(1.0)
        waited = sum(ProcessCpu(child.pid).wait_seconds() for child in children)
    finally:
        for child in children:
            child.wait()
    assert waited > 0.05
    assert thread_wait_seconds(os.getpid()) >= 0.0
    assert thread_wait_seconds(2**22 + 1) == 0.0  # no such process
    line = describe_waits({"postgres": 0.5, "headrace": 1.25})
    assert line.endswith("postgres 0.50, headrace 1.25")


def test_the_writer_threads_time_on_a_core_is_a_share_of_the_window() -> None:
    # The writer of `headrace run` is its main thread; here, this process's main thread
    # busy for most of the window.
    share = writer_thread_share(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    shares = share.stop()
    assert set(shares) == {"on_cpu", "waiting"}
    assert 0.3 <= shares["on_cpu"] + shares["waiting"] <= 1.05
    assert thread_schedstat(2**22 + 1, 2**22 + 1) == (0.0, 0.0)  # no such thread
    line = describe_writer_thread({"on_cpu": 0.33, "waiting": 0.51})
    assert line.endswith(
        "on a core 0.33 of the time, waiting for one 0.51, the rest (blocked or idle) 0.16"
    )


def test_cpu_per_change_is_the_windows_cpu_seconds_over_the_changes() -> None:
    used = iter([1.0, 3.5])
    share = CpuShare({"headrace": lambda: next(used)})
    share.start()
    share.stop()
    assert share.seconds == {"headrace": 2.5}
    assert cpu_per_change_us(share.seconds, 250_000) == {"headrace": 10.0}
    assert cpu_per_change_us(share.seconds, 0) == {}
    line = describe_cost_per_change({"postgres": 11.0, "headrace": 9.5}, 100_000)
    machine = os.cpu_count() or 1
    assert line == (
        "CPU per change, in µs: postgres 11.0, headrace 9.5; 20.5 in all; "
        f"{machine} cores allow {machine * 10:.1f} per change at 100,000 changes/s"
    )
    assert describe_cost_per_change({"headrace": 1.0}, 0).endswith("1.0 in all")
