"""The job queue: highest priority first, then oldest, and a busy plugin holds back no one.
A job is its own entry in the heap: discarded and pushed again, it still runs once."""

from __future__ import annotations

import pytest

from kinod.jobqueue import JobQueue, Queueable


class Item(Queueable):
    """What the queue needs of a job, and nothing else."""

    __slots__ = ()


def anything(plugin: str) -> bool:
    return True


def drain(queue: JobQueue[Item], can_run=anything) -> list[str]:
    order = []
    while (item := queue.pop(can_run)) is not None:
        order.append(item.id)
    return order


def push(queue: JobQueue[Item], job_id: str, plugin: str = "p", priority: int = 0,
         submitted_ns: int = 0) -> Item:
    item = Item(job_id, submitted_ns)
    queue.push(item, plugin, priority)
    return item


def test_empty_queue() -> None:
    queue = JobQueue()
    assert len(queue) == 0
    assert queue.pop(anything) is None


def test_higher_priority_first_then_oldest() -> None:
    queue = JobQueue()
    push(queue, "low-old", priority=0, submitted_ns=1)
    push(queue, "high-new", priority=5, submitted_ns=30)
    push(queue, "low-new", priority=0, submitted_ns=20)
    push(queue, "high-old", priority=5, submitted_ns=10)
    push(queue, "negative", priority=-1, submitted_ns=0)
    assert drain(queue) == ["high-old", "high-new", "low-old", "low-new", "negative"]
    assert len(queue) == 0


def test_exact_ties_run_in_order_of_id() -> None:
    queue = JobQueue()
    for job_id in ("c", "a", "b"):
        push(queue, job_id, submitted_ns=100)
    assert drain(queue) == ["a", "b", "c"]


def test_a_job_discarded_and_pushed_again_runs_once_in_its_new_place() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    push(queue, "b", submitted_ns=2)
    queue.discard(a)
    queue.push(a, "p", priority=-1)  # its old entry is still in the heap, ahead of b
    assert len(queue) == 2
    assert drain(queue) == ["b", "a"]
    x = push(queue, "x", submitted_ns=5)
    queue.discard(x)
    queue.push(x, "p", priority=0)  # the same place as before
    assert drain(queue) == ["x"]
    assert len(queue) == 0


def test_a_discarded_job_pushed_again_for_another_plugin_runs_once_there() -> None:
    queue = JobQueue()
    a = push(queue, "a", plugin="old", submitted_ns=1)
    queue.discard(a)
    queue.push(a, "new", priority=0)
    assert drain(queue, can_run=lambda plugin: plugin == "old") == []
    assert drain(queue) == ["a"]
    assert len(queue) == 0


def test_two_jobs_of_one_id_are_two_entries() -> None:
    queue = JobQueue()
    first, again = Item("a", 1), Item("a", 1)  # a stale job beside its resubmission
    queue.push(first, "p", 0)
    queue.push(again, "p", 0)
    queue.discard(first)
    assert queue.pop(anything) is again
    assert queue.pop(anything) is None


def test_order_holds_across_plugins() -> None:
    queue = JobQueue()
    push(queue, "a1", "a", priority=0, submitted_ns=3)
    push(queue, "b1", "b", priority=0, submitted_ns=1)
    push(queue, "a2", "a", priority=1, submitted_ns=5)
    push(queue, "b2", "b", priority=0, submitted_ns=2)
    assert drain(queue) == ["a2", "b1", "b2", "a1"]


def test_len_and_holds() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    push(queue, "b", submitted_ns=2)
    assert len(queue) == 2
    assert queue.holds(a)
    assert not queue.holds(Item("zzz", 0))
    assert queue.pop(anything) is a
    assert not queue.holds(a)
    assert len(queue) == 1


def test_pushing_a_queued_job_again_is_refused() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    with pytest.raises(ValueError, match="already queued"):
        queue.push(a, "other", 9)
    assert len(queue) == 1
    assert drain(queue) == ["a"]


def test_discard() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    push(queue, "b", submitted_ns=2)
    push(queue, "c", submitted_ns=3)
    assert queue.discard(a) is True
    assert queue.discard(a) is False
    assert queue.discard(Item("never", 0)) is False
    assert not queue.holds(a)
    assert len(queue) == 2
    assert drain(queue) == ["b", "c"]


def test_discard_then_push_again() -> None:
    queue = JobQueue()
    a = push(queue, "a", priority=9, submitted_ns=1)
    push(queue, "b", submitted_ns=2)
    queue.discard(a)
    queue.push(a, "p", 0)  # now with b's priority: the older of the two
    assert drain(queue) == ["a", "b"]
    assert len(queue) == 0


def test_discarding_everything_empties_the_queue() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    b = push(queue, "b", plugin="q", submitted_ns=2)
    queue.discard(a)
    queue.discard(b)
    assert queue.pop(anything) is None
    assert len(queue) == 0
    queue.push(a, "p", 0)  # its entry left the heap as stale: pushed afresh
    assert drain(queue) == ["a"]


def test_blocked_plugin_does_not_hold_back_others() -> None:
    queue = JobQueue()
    push(queue, "sdxl-urgent", "sdxl", priority=10, submitted_ns=1)
    push(queue, "sdxl-2", "sdxl", priority=10, submitted_ns=2)
    push(queue, "example-1", "example", priority=0, submitted_ns=3)
    push(queue, "example-2", "example", priority=0, submitted_ns=4)

    def sdxl_is_full(plugin: str) -> bool:
        return plugin != "sdxl"

    assert drain(queue, sdxl_is_full) == ["example-1", "example-2"]
    assert len(queue) == 2
    assert drain(queue) == ["sdxl-urgent", "sdxl-2"]  # free again: its jobs, in order


def test_can_run_is_asked_per_plugin_not_per_job() -> None:
    queue = JobQueue()
    for i in range(5):
        push(queue, f"a{i}", "a", submitted_ns=i)
    push(queue, "b0", "b", submitted_ns=99)
    asked: list[str] = []

    def record(plugin: str) -> bool:
        asked.append(plugin)
        return False

    assert queue.pop(record) is None
    assert sorted(asked) == ["a", "b"]
    assert len(queue) == 6


def test_nothing_can_run() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    assert queue.pop(lambda plugin: False) is None
    assert queue.holds(a)


def test_discarded_job_in_a_blocked_plugin_is_not_returned_later() -> None:
    queue = JobQueue()
    a = push(queue, "a", submitted_ns=1)
    push(queue, "b", submitted_ns=2)
    assert queue.pop(lambda plugin: False) is None
    queue.discard(a)
    assert drain(queue) == ["b"]


def test_a_heap_keeps_no_entry_beside_its_jobs() -> None:
    """The memory a backlog costs: the heap holds the jobs themselves."""
    queue = JobQueue()
    items = [push(queue, f"j{i}", submitted_ns=i) for i in range(3)]
    assert all(isinstance(entry, Item) for entry in queue._heaps["p"])
    assert sorted(queue._heaps["p"], key=lambda item: item.id) == items
