"""The machine figures printed beside a benchmark's own: the kernel's autogroup setting."""

from __future__ import annotations

from pathlib import Path

from headrace.bench.calibration import AUTOGROUP_SETTING, autogroup_enabled, describe_scheduling


def test_autogroup_setting_read_from_the_kernel(tmp_path: Path) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    on.write_text("1\n")
    off.write_text("0\n")
    assert autogroup_enabled(on) is True
    assert autogroup_enabled(off) is False
    assert autogroup_enabled(tmp_path / "missing") is None
    if AUTOGROUP_SETTING.exists():  # this machine's own, as the benchmark reads it
        assert autogroup_enabled() is (AUTOGROUP_SETTING.read_text().strip() != "0")


def test_scheduling_line_says_who_shares_a_group() -> None:
    assert "each PostgreSQL backend is a scheduling group" in describe_scheduling(True)
    assert "autogroup off" in describe_scheduling(False)
    assert "not readable" in describe_scheduling(None)
