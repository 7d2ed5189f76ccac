"""The source → writer queue: bounded in batches, but small batches may pile up for merging."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from headrace.run.change_queue import HARD_MAX_ITEMS, ChangeQueue


def test_small_batches_queue_beyond_the_batch_limit_while_their_changes_fit() -> None:
    items: ChangeQueue[int] = ChangeQueue(max_batches=2, max_changes=1_000)
    for i in range(10):
        items.put(i, 100, timeout=0.01)  # 10 x 100 changes fit into 1,000
    with pytest.raises(queue.Full):
        items.put(10, 100, timeout=0.01)
    assert [items.get_nowait() for _ in range(10)] == list(range(10))
    with pytest.raises(queue.Empty):
        items.get_nowait()


def test_large_batches_are_limited_by_the_batch_count() -> None:
    items: ChangeQueue[str] = ChangeQueue(max_batches=2, max_changes=1_000)
    items.put("a", 5_000, timeout=0.01)
    items.put("b", 5_000, timeout=0.01)  # under max_batches: always accepted
    with pytest.raises(queue.Full):
        items.put("c", 1, timeout=0.01)
    assert items.get(timeout=0.01) == "a"
    items.put("c", 1, timeout=0.01)
    assert items.qsize() == 2


def test_empty_batches_are_capped() -> None:
    items: ChangeQueue[int] = ChangeQueue(max_batches=1, max_changes=10)
    for i in range(HARD_MAX_ITEMS):
        items.put(i, 0, timeout=0.01)
    with pytest.raises(queue.Full):
        items.put(-1, 0, timeout=0.01)


def test_a_waiting_put_proceeds_when_the_writer_takes_an_item() -> None:
    items: ChangeQueue[int] = ChangeQueue(max_batches=1, max_changes=0)
    items.put(1, 10, timeout=0.01)
    done = threading.Event()

    def producer() -> None:
        items.put(2, 10, timeout=5.0)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.05)
    assert items.get(timeout=1.0) == 1
    assert done.wait(5.0)
    thread.join()
    assert items.get(timeout=1.0) == 2
    with pytest.raises(queue.Empty):
        items.get(timeout=0.01)


def test_consumer_waiting_only_while_a_get_waits_on_an_empty_queue() -> None:
    items: ChangeQueue[int] = ChangeQueue(max_batches=2, max_changes=100)
    assert not items.consumer_waiting()
    got: list[int] = []
    consumer = threading.Thread(target=lambda: got.append(items.get(timeout=5.0)))
    consumer.start()
    deadline = time.monotonic() + 5.0
    while not items.consumer_waiting() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert items.consumer_waiting()
    items.put(1, 10, timeout=0.01)
    # Queued for it: no longer waiting for want of an item, even before it wakes.
    assert not items.consumer_waiting()
    consumer.join()
    assert got == [1]
    assert not items.consumer_waiting()
