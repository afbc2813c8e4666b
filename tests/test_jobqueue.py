"""The job queue: highest priority first, then oldest, and a busy plugin holds back no one."""

from __future__ import annotations

import pytest

from kinod.jobqueue import JobQueue


def anything(plugin: str) -> bool:
    return True


def drain(queue: JobQueue, can_run=anything) -> list[str]:
    order = []
    while (job_id := queue.pop(can_run)) is not None:
        order.append(job_id)
    return order


def test_empty_queue() -> None:
    queue = JobQueue()
    assert len(queue) == 0
    assert queue.pop(anything) is None


def test_higher_priority_first_then_oldest() -> None:
    queue = JobQueue()
    queue.push("low-old", "p", priority=0, submitted_ns=1)
    queue.push("high-new", "p", priority=5, submitted_ns=30)
    queue.push("low-new", "p", priority=0, submitted_ns=20)
    queue.push("high-old", "p", priority=5, submitted_ns=10)
    queue.push("negative", "p", priority=-1, submitted_ns=0)
    assert drain(queue) == ["high-old", "high-new", "low-old", "low-new", "negative"]
    assert len(queue) == 0


def test_exact_ties_run_in_order_of_id() -> None:
    queue = JobQueue()
    for job_id in ("c", "a", "b"):
        queue.push(job_id, "p", priority=0, submitted_ns=100)
    assert drain(queue) == ["a", "b", "c"]


def test_an_id_discarded_and_pushed_again_runs_once_in_its_new_place() -> None:
    queue = JobQueue()
    queue.push("a", "p", priority=0, submitted_ns=1)
    queue.push("b", "p", priority=0, submitted_ns=2)
    queue.discard("a")
    queue.push("a", "p", priority=0, submitted_ns=3)
    assert drain(queue) == ["b", "a"]
    queue.push("x", "p", priority=0, submitted_ns=5)
    queue.discard("x")
    queue.push("x", "p", priority=0, submitted_ns=5)  # the same item, made again
    assert drain(queue) == ["x"]
    assert len(queue) == 0


def test_order_holds_across_plugins() -> None:
    queue = JobQueue()
    queue.push("a1", "a", priority=0, submitted_ns=3)
    queue.push("b1", "b", priority=0, submitted_ns=1)
    queue.push("a2", "a", priority=1, submitted_ns=5)
    queue.push("b2", "b", priority=0, submitted_ns=2)
    assert drain(queue) == ["a2", "b1", "b2", "a1"]


def test_len_and_contains() -> None:
    queue = JobQueue()
    queue.push("a", "p", 0, 1)
    queue.push("b", "p", 0, 2)
    assert len(queue) == 2
    assert "a" in queue
    assert "zzz" not in queue
    assert queue.pop(anything) == "a"
    assert "a" not in queue
    assert len(queue) == 1


def test_pushing_a_queued_id_again_is_refused() -> None:
    queue = JobQueue()
    queue.push("a", "p", 0, 1)
    with pytest.raises(ValueError, match="already queued"):
        queue.push("a", "other", 9, 2)
    assert drain(queue) == ["a"]


def test_discard() -> None:
    queue = JobQueue()
    queue.push("a", "p", 0, 1)
    queue.push("b", "p", 0, 2)
    queue.push("c", "p", 0, 3)
    assert queue.discard("a") is True
    assert queue.discard("a") is False
    assert queue.discard("never") is False
    assert "a" not in queue
    assert len(queue) == 2
    assert drain(queue) == ["b", "c"]


def test_discard_then_push_again() -> None:
    queue = JobQueue()
    queue.push("a", "p", 9, 1)
    queue.push("b", "p", 0, 2)
    queue.discard("a")
    queue.push("a", "p", 0, 3)  # resubmitted, now with a lower priority
    assert drain(queue) == ["b", "a"]
    assert len(queue) == 0


def test_discarding_everything_empties_the_queue() -> None:
    queue = JobQueue()
    queue.push("a", "p", 0, 1)
    queue.push("b", "q", 0, 2)
    queue.discard("a")
    queue.discard("b")
    assert queue.pop(anything) is None
    assert len(queue) == 0


def test_blocked_plugin_does_not_hold_back_others() -> None:
    queue = JobQueue()
    queue.push("sdxl-urgent", "sdxl", priority=10, submitted_ns=1)
    queue.push("sdxl-2", "sdxl", priority=10, submitted_ns=2)
    queue.push("example-1", "example", priority=0, submitted_ns=3)
    queue.push("example-2", "example", priority=0, submitted_ns=4)

    def sdxl_is_full(plugin: str) -> bool:
        return plugin != "sdxl"

    assert queue.pop(sdxl_is_full) == "example-1"
    assert queue.pop(sdxl_is_full) == "example-2"
    assert queue.pop(sdxl_is_full) is None
    assert len(queue) == 2
    assert drain(queue) == ["sdxl-urgent", "sdxl-2"]  # free again: its jobs, in order


def test_can_run_is_asked_per_plugin_not_per_job() -> None:
    queue = JobQueue()
    for i in range(5):
        queue.push(f"a{i}", "a", 0, i)
    queue.push("b0", "b", 0, 99)
    asked: list[str] = []

    def record(plugin: str) -> bool:
        asked.append(plugin)
        return False

    assert queue.pop(record) is None
    assert sorted(asked) == ["a", "b"]
    assert len(queue) == 6


def test_nothing_can_run() -> None:
    queue = JobQueue()
    queue.push("a", "p", 0, 1)
    assert queue.pop(lambda plugin: False) is None
    assert "a" in queue


def test_discarded_job_in_a_blocked_plugin_is_not_returned_later() -> None:
    queue = JobQueue()
    queue.push("a", "p", 0, 1)
    queue.push("b", "p", 0, 2)
    assert queue.pop(lambda plugin: False) is None
    queue.discard("a")
    assert drain(queue) == ["b"]
