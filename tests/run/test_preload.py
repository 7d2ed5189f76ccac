"""The ``headrace`` command on jemalloc (:mod:`headrace.run.preload`): real processes, their
``/proc/PID/maps`` and environment; the process keeps its PID, arguments and output, and
what it starts keeps the C library's allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from headrace.run.preload import MALLOC_ENV, allocator_in_use, find_jemalloc

# What the probe process reports after choosing its allocator the way `headrace` does.
PROBE = """
import json, os, subprocess, sys
from headrace.run.preload import allocator_in_use, preload_jemalloc
preload_jemalloc()
child = subprocess.run(
    ["sh", "-c", "echo \\"$LD_PRELOAD\\"; grep -c jemalloc /proc/self/maps || true"],
    capture_output=True, text=True, check=True,
).stdout.split("\\n")
print(json.dumps({
    "pid": os.getpid(),
    "argv": sys.argv[1:],
    "allocator": allocator_in_use(),
    "ld_preload": os.environ.get("LD_PRELOAD"),
    "markers": [k for k in os.environ if k.startswith("_HEADRACE")],
    "child_ld_preload": child[0],
    "child_jemalloc_maps": int(child[1]),
}))
"""

JEMALLOC = find_jemalloc()
needs_jemalloc = pytest.mark.skipif(
    JEMALLOC is None, reason="libjemalloc2 is not installed (make system-deps installs it)"
)


def _probe(env_changes: dict[str, str | None], *args: str) -> tuple[dict[str, Any], int, str]:
    env = dict(os.environ)
    for name in ("LD_PRELOAD", MALLOC_ENV):
        env.pop(name, None)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    process = subprocess.Popen(
        [sys.executable, "-c", PROBE, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return json.loads(out), process.pid, err


@needs_jemalloc
def test_runs_again_on_jemalloc_with_the_same_pid_and_arguments() -> None:
    report, pid, err = _probe({}, "run", "--config", "x y.yaml")
    assert report["allocator"] == "jemalloc"
    assert report["pid"] == pid, "executed again in place: the parent's PID still points at it"
    assert report["argv"] == ["run", "--config", "x y.yaml"]
    assert err == ""


@needs_jemalloc
def test_children_keep_the_c_library_allocator() -> None:
    report, _, _ = _probe({"LD_PRELOAD": None})
    assert report["allocator"] == "jemalloc"
    assert report["ld_preload"] is None, "LD_PRELOAD taken back out of the environment"
    assert report["markers"] == []
    assert report["child_ld_preload"] == ""
    assert report["child_jemalloc_maps"] == 0


def test_system_keeps_the_c_library_allocator() -> None:
    report, _, err = _probe({MALLOC_ENV: "system"})
    assert report["allocator"] == "system"
    assert report["ld_preload"] is None
    assert err == ""


def test_a_missing_library_is_reported_and_the_command_runs_on() -> None:
    report, _, err = _probe({MALLOC_ENV: "/nonexistent/libmalloc.so"})
    assert report["allocator"] == "system"
    assert "HEADRACE_MALLOC=/nonexistent/libmalloc.so: no such file" in err
    assert "auto, system, or an allocator library's path" in err


@needs_jemalloc
def test_an_allocator_the_user_preloaded_is_left_alone() -> None:
    assert JEMALLOC is not None
    report, _, _ = _probe({"LD_PRELOAD": JEMALLOC})
    assert report["allocator"] == "jemalloc"
    assert report["ld_preload"] == JEMALLOC, "the user's LD_PRELOAD stays, for children too"
    assert report["child_ld_preload"] == JEMALLOC


@needs_jemalloc
def test_another_preloaded_library_is_kept_beside_jemalloc() -> None:
    # An LD_PRELOAD naming no allocator: jemalloc goes in front of it for this process,
    # and children see the user's value alone.
    report, _, err = _probe({"LD_PRELOAD": "libm.so.6"})
    assert report["allocator"] == "jemalloc"
    assert report["ld_preload"] == "libm.so.6"
    assert report["child_ld_preload"] == "libm.so.6"
    assert report["child_jemalloc_maps"] == 0
    assert err == ""


def test_allocator_of_a_process_that_is_gone() -> None:
    assert allocator_in_use(2**22 + 12345) == "unknown"
