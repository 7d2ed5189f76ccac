"""The run's garbage collector: the start-up heap frozen while streaming, unfrozen after."""

from __future__ import annotations

import gc
import threading

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


def test_status_read_while_the_collector_runs_on_the_same_thread() -> None:
    """A collection can start inside ``document()`` (it allocates): its callback runs on
    the reading thread, which must not wait for itself (the status thread hung so once)."""
    collector = Collector().settle()
    young, middle, full = gc.get_threshold()
    read = threading.Event()

    def read_often() -> None:
        for _ in range(2000):
            collector.document()
        read.set()

    try:
        gc.set_threshold(1, middle, full)  # a young collection at almost every allocation
        threading.Thread(target=read_often, daemon=True).start()
        assert read.wait(20), "document() waited for the collector's callback on its own thread"
    finally:
        gc.set_threshold(young, middle, full)
        collector.restore()
    assert collector.collections[0] > 0
