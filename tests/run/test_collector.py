"""The run's garbage collector: the start-up heap frozen while streaming, unfrozen after."""

from __future__ import annotations

import gc

from headrace.run.collector import FULL_EVERY, Collector


def test_settle_freezes_the_heap_and_restore_unfreezes_it() -> None:
    before = gc.get_threshold()
    collector = Collector().settle()
    try:
        assert gc.get_threshold() == (before[0], before[1], FULL_EVERY)
        assert collector.frozen == gc.get_freeze_count() > 0
        cycles = []
        for _ in range(1000):
            cycle: list[object] = []
            cycle.append(cycle)  # cyclic garbage is still collected
            cycles.append(cycle)
        del cycles, cycle
        assert gc.collect() >= 1000
        figures = collector.document()
        assert figures["collections"][2] >= 1
        assert figures["pause_ms"][2] >= figures["longest_pause_ms"][2] > 0
        assert figures["frozen_objects"] == collector.frozen
    finally:
        collector.restore()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    calls = collector.document()["collections"]
    gc.collect()
    assert collector.document()["collections"] == calls  # no longer listening
    collector.restore()  # a second restore changes nothing
    assert gc.get_threshold() == before
