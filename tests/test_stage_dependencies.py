"""The dependencies stage alone: when a job with ``after`` may be queued, what fails it, and
the search for circles. Sidecars are real files; the other stages are fakes."""

from __future__ import annotations

from pathlib import Path

from kinod.models import JobState
from kinod.stages.dependencies import Dependencies, _cycles
from tests.stage_fakes import job_of, make_rig, sidecar_in, write_job


def deps_rig(tmp_path: Path):
    rig = make_rig(tmp_path)
    rig.ctx.dependencies = deps = Dependencies(rig.ctx)
    return rig, deps


def waiting(rig, job_id: str, after: list[str]):
    job = job_of(rig.ctx, write_job(rig.spool.queued, job_id, {
        "type": "example", "data": {"prompt": "p"}, "after": after}))
    job.wait_light()
    rig.scheduler.held[job_id] = job
    return job


def test_a_job_whose_dependencies_succeeded_is_ready_at_once(tmp_path: Path) -> None:
    rig, deps = deps_rig(tmp_path)
    rig.ctx.outbox.publish(sidecar_in(JobState.SUCCEEDED, "a"))
    assert deps.ready(waiting(rig, "b", ["a"]))
    assert len(deps) == 0


def test_a_job_waits_for_an_unseen_id_and_is_released_when_it_succeeds(tmp_path: Path) -> None:
    rig, deps = deps_rig(tmp_path)
    job = waiting(rig, "b", ["a", "c"])
    assert not deps.ready(job)
    assert len(deps) == 1
    deps.ended("a", JobState.SUCCEEDED)
    assert rig.scheduler.called("after_dependencies") == []
    rig.ctx.outbox.publish(sidecar_in(JobState.SUCCEEDED, "c"))  # an end on another node
    deps.look()
    assert rig.scheduler.called("after_dependencies") == [(job,)]
    assert len(deps) == 0


def test_a_dependency_that_failed_or_stopped_fails_the_job(tmp_path: Path) -> None:
    rig, deps = deps_rig(tmp_path)
    rig.ctx.outbox.publish(sidecar_in(JobState.STOPPED, "a"))
    job = waiting(rig, "b", ["a"])
    assert not deps.ready(job)
    ((ended, state, error),) = rig.ending.called("end_waiting")
    assert (ended, state, error.code) == (job, JobState.FAILED, "dependency_failed")
    assert "job a" in error.message and "stopped" in error.message


def test_a_failure_fails_a_long_chain_without_deep_recursion(tmp_path: Path) -> None:
    rig, deps = deps_rig(tmp_path)
    jobs = [waiting(rig, f"j{n}", [f"j{n - 1}"]) for n in range(1, 3000)]
    assert not any(deps.ready(job) for job in jobs)

    def end_waiting(job, state, error):  # as the real ending stage: the end is heard
        deps.ended(job.id, state)

    rig.ending.end_waiting = end_waiting
    deps.ended("j0", JobState.FAILED)
    assert len(deps) == 0


def test_circles_are_found_and_what_only_leads_into_one_is_not_in_it() -> None:
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": ["e2"], "e2": []}
    found = _cycles(["d", "e"], lambda node: edges.get(node, ()))
    assert [sorted(cycle) for cycle in found] == [["a", "b", "c"]]


def test_a_chain_of_thousands_is_searched_without_recursion() -> None:
    found = _cycles(["n0"], lambda node: [f"n{int(node[1:]) + 1}"] if node != "n5000" else [])
    assert found == []
