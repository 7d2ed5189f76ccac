"""A benchmark's generator process: its JSON line, its failure, and a late one stopped.

Real child processes: a small generator module written into a temporary
directory on the children's PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headrace.bench.workload_process import WorkloadFailedError, WorkloadProcess

GENERATOR = """
import json, sys, time
from headrace.bench.workload_process import dump_stacks_on_signal

def hang_here():
    time.sleep(3600)

dump_stacks_on_signal()
options = json.loads(sys.argv[1])
if options["mode"] == "hang":
    print("written so far", flush=True)
    hang_here()
if options["mode"] == "fail":
    sys.exit(3)
print("x" * 200_000)  # more than a pipe holds: must not block the generator
print(json.dumps({"written": options["rows"]}), flush=True)
"""


@pytest.fixture
def generator_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "hr_test_generator.py").write_text(GENERATOR)
    src = str(Path(__file__).resolve().parents[2] / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), src]))
    return "hr_test_generator"


def test_its_last_line_is_the_result(generator_module: str) -> None:
    ticks: list[float] = []
    process = WorkloadProcess(generator_module, {"mode": "ok", "rows": 7})
    assert process.wait(60, lambda: ticks.append(time.monotonic())) == {"written": 7}


def test_a_failed_generator_is_an_error(generator_module: str) -> None:
    process = WorkloadProcess(generator_module, {"mode": "fail"})
    with pytest.raises(WorkloadFailedError, match=r"failed \(exit code 3\)"):
        process.wait(60)


def test_a_late_generator_prints_its_stacks_and_is_stopped(
    generator_module: str, capfd: pytest.CaptureFixture[str]
) -> None:
    process = WorkloadProcess(generator_module, {"mode": "hang"})
    time.sleep(1.0)  # let it register its handler
    started = time.monotonic()
    with pytest.raises(WorkloadFailedError, match="did not finish within 1 s"):
        process.wait(1.0)
    assert time.monotonic() - started < 10
    assert process.process.poll() is not None  # not left running
    assert "hang_here" in capfd.readouterr().err  # where it was stuck


def test_sigterm_stops_a_benchmark_cleanly(tmp_path: Path) -> None:
    """`timeout` sends SIGTERM: the bench command unwinds (its `finally` blocks run)."""
    script = tmp_path / "bench_sigterm.py"
    marker = tmp_path / "cleaned"
    script.write_text(
        "import sys, time\n"
        "from headrace.cli.bench import _every_benchmark\n"
        "_every_benchmark()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').close()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 128 + signal.SIGTERM
    child.stdout.close()
    assert marker.exists()
