"""Where a benchmark's CPU went: PostgreSQL, the workload generator, headrace.

The benchmarks run everything on one machine (2 cores on the development
machine): PostgreSQL executing the workload and decoding it for the
walsender, the generator process, and headrace. A latency or throughput
figure means little without knowing how much of the machine headrace had, so
the benchmarks report each party's CPU over the load window, in cores, and how
long their threads waited for a core (runnable, not running): on a machine whose
cores are all busy that wait, not the work, is what a latency figure is made of.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import psutil


class ProcessCpu:
    """CPU seconds (user + system) and RSS of a process, optionally with its children."""

    def __init__(self, pid: int, *, children: bool = False) -> None:
        self.process = psutil.Process(pid)
        self.children = children

    def _all(self) -> list[psutil.Process]:
        if not self.children:
            return [self.process]
        return [self.process, *self.process.children(recursive=True)]

    def cpu_seconds(self) -> float:
        """CPU seconds used so far; with ``children``, also those of children that
        exited and were waited for (PostgreSQL's backends of closed connections)."""
        total = 0.0
        for each in self._all():
            try:
                times = each.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
            if self.children and each.pid == self.process.pid:
                total += times.children_user + times.children_system
        return total

    def wait_seconds(self) -> float:
        """Seconds its live threads (and, with ``children``, its live children's) spent
        runnable but waiting for a CPU, so far (see :func:`thread_wait_seconds`)."""
        return sum(thread_wait_seconds(each.pid) for each in self._all())

    def rss(self) -> int:
        """Resident bytes now (of the process alone)."""
        try:
            return int(self.process.memory_info().rss)
        except psutil.Error:
            return 0


def thread_schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of thread ``tid`` of
    process ``pid`` so far (Linux's ``/proc/PID/task/TID/schedstat``); zeros where the
    kernel does not report it or the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
            fields = handle.read().split()
    except OSError:
        return 0.0, 0.0
    if len(fields) < 2:
        return 0.0, 0.0
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def thread_wait_seconds(pid: int) -> float:
    """Seconds the threads of process ``pid`` alive now spent runnable but waiting for a
    CPU (the second field of Linux's ``/proc/PID/task/TID/schedstat``); 0.0 where the
    kernel does not report it. Threads that exited are not counted."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    # A thread that exited meanwhile counts 0.
    return sum((thread_schedstat(pid, int(task))[1] for task in tasks), 0.0)


def postgres_cpu(datadir: Path) -> ProcessCpu:
    """The cluster's processes (postmaster and every backend, walsender included)."""
    pid_file = datadir / "postmaster.pid"
    return ProcessCpu(int(pid_file.read_text().split()[0]), children=True)


def waited_children_cpu_seconds() -> float:
    """CPU seconds of this process's children that exited and were waited for (a
    generator process, once :meth:`subprocess.Popen.wait` returned)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuShare:
    """CPU of named parties between :meth:`start` and :meth:`stop`, in cores."""

    def __init__(self, meters: dict[str, Callable[[], float]]) -> None:
        self.meters = meters
        self._start: dict[str, float] = {}
        self._started = 0.0
        self.seconds: dict[str, float] = {}
        """Each party's CPU seconds over the window :meth:`stop` closed."""

    def start(self) -> None:
        self._start = {name: meter() for name, meter in self.meters.items()}
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Each party's cores over the window (CPU seconds / wall seconds)."""
        window = max(time.monotonic() - self._started, 1e-9)
        self.seconds = {name: meter() - self._start[name] for name, meter in self.meters.items()}
        return {name: round(used / window, 2) for name, used in self.seconds.items()}


def load_cpu_share(postgres: ProcessCpu | None, headrace: Callable[[], float]) -> CpuShare:
    """A started :class:`CpuShare` of PostgreSQL (None: on another machine, not
    measured), the generator (a child process that is waited for before
    :meth:`CpuShare.stop`) and headrace (its CPU seconds reader)."""
    meters: dict[str, Callable[[], float]] = {}
    if postgres is not None:
        meters["postgres"] = postgres.cpu_seconds
    meters |= {"generator": waited_children_cpu_seconds, "headrace": headrace}
    share = CpuShare(meters)
    share.start()
    return share


def load_wait_share(postgres: ProcessCpu | None, headrace: Callable[[], float]) -> CpuShare:
    """A started :class:`CpuShare` of the seconds PostgreSQL's (unless None) and
    headrace's threads wait for a CPU (:meth:`ProcessCpu.wait_seconds`; headrace's
    reader given)."""
    meters: dict[str, Callable[[], float]] = {}
    if postgres is not None:
        meters["postgres"] = postgres.wait_seconds
    meters["headrace"] = headrace
    share = CpuShare(meters)
    share.start()
    return share


def writer_thread_share(pid: int) -> CpuShare:
    """A started :class:`CpuShare` of the writer thread of ``headrace run`` (its main
    thread, whose id is the process id): the share of the window it ran on a core
    (``on_cpu``) and the share it was runnable but waiting for one (``waiting``). The
    rest it was blocked: on the GIL, on DuckDB's workers, or idle for want of a batch.

    A writer busy all the time with a large ``waiting`` share is short of cores, not of
    speed: the figure that tells a saturated machine from a slow engine."""
    share = CpuShare(
        {
            "on_cpu": lambda: thread_schedstat(pid, pid)[0],
            "waiting": lambda: thread_schedstat(pid, pid)[1],
        }
    )
    share.start()
    return share


def describe_writer_thread(shares: dict[str, float]) -> str:
    """One line: the writer thread's time on a core, waiting for one, and the rest."""
    on_cpu, waiting = shares.get("on_cpu", 0.0), shares.get("waiting", 0.0)
    rest = max(0.0, 1.0 - on_cpu - waiting)
    return (
        f"the writer thread over the load: on a core {on_cpu:.2f} of the time, waiting for "
        f"one {waiting:.2f}, the rest (blocked or idle) {rest:.2f}"
    )


def describe_waits(waits: dict[str, float]) -> str:
    """One line: each party's threads' wait for a CPU, in thread-seconds per second."""
    parts = ", ".join(f"{name} {value:.2f}" for name, value in waits.items())
    return (
        f"waiting for a CPU (threads runnable, not running), in thread-seconds per second: {parts}"
    )


def cpu_per_change_us(seconds: dict[str, float], changes: int) -> dict[str, float]:
    """Each party's CPU per change, in microseconds, from its CPU ``seconds`` over a window
    in which ``changes`` changes were written and applied: unlike cores, a cost that does
    not depend on the rate reached, so runs at different rates and days compare."""
    if changes <= 0:
        return {}
    return {name: round(used / changes * 1e6, 2) for name, used in seconds.items()}


def describe_cost_per_change(costs: dict[str, float], rate: float) -> str:
    """One line: each party's CPU per change and their sum, against what the machine's
    cores allow per change at ``rate`` changes/s (the budget the sum must stay under for
    the machine to carry that rate at all)."""
    machine = os.cpu_count() or 1
    total = sum(costs.values())
    parts = ", ".join(f"{name} {value:.1f}" for name, value in costs.items())
    line = f"CPU per change, in µs: {parts}; {total:.1f} in all"
    if rate > 0:
        budget = machine / rate * 1e6
        line += f"; {machine} cores allow {budget:.1f} per change at {rate:,.0f} changes/s"
    return line


def describe_cores(cores: dict[str, float]) -> str:
    """One line: each party's cores and what was left of the machine."""
    machine = os.cpu_count() or 1
    used = sum(cores.values())
    parts = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
    rest = max(0.0, machine - used)
    return f"CPU over the load, in cores of {machine}: {parts}; the rest (idle or other) {rest:.2f}"
