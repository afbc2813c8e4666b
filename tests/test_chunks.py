"""Frame ranges, and a job split into chunks (kinod.chunks)."""

from __future__ import annotations

import json

import pytest
import yaml

from kinod.chunks import (
    MAX_CHUNKS,
    MAX_FRAME,
    ChunkError,
    encode,
    format_frames,
    parse_frames,
    split_job,
)
from kinod.intake import check_job
from kinod.job_document import parse_document


@pytest.mark.parametrize(("spec", "frames"), [
    ("1-5", [1, 2, 3, 4, 5]),
    ("1,5,10-12", [1, 5, 10, 11, 12]),
    (" 7 ", [7]),
    (7, [7]),
    (0, [0]),
    ("3,1-2,2", [1, 2, 3]),
    (f"{MAX_FRAME}", [MAX_FRAME]),
])
def test_frame_ranges(spec, frames) -> None:
    assert parse_frames(spec) == frames


@pytest.mark.parametrize(("spec", "message"), [
    ("5-1", "runs backwards"),
    ("", "empty or negative frame"),
    ("-3", "empty or negative frame"),
    ("1,,2", "empty or negative frame"),
    ("a", "is not a frame number"),
    ("1-", "is not a frame number"),
    ("١", "is not a frame number"),  # a digit, but not an ASCII one
    (MAX_FRAME + 1, "outside 0 to"),
    (-1, "outside 0 to"),
    ("0-999999", "more than 200000 frames"),
    (1.5, "must be a frame range"),
    (True, "must be a frame range"),
    (None, "must be a frame range"),
    ([1, 2], "must be a frame range"),
])
def test_bad_frame_ranges(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_frames(spec)


def test_frames_written_back_as_short_ranges() -> None:
    assert format_frames([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    assert format_frames([1, 2, 3, 7], dash="..") == "1..3,7"
    assert format_frames([4]) == "4"


JOB = {"name": "Shot 010", "type": "blender", "priority": 3,
       "data": {"blend_file": "shot010.blend", "frames": "1-25", "samples": 16}}


def test_one_job_per_chunk_named_by_its_first_and_last_frame() -> None:
    jobs = split_job("shot010", JOB, 10)
    assert [job_id for job_id, _ in jobs] == [
        "shot010.0001-0010", "shot010.0011-0020", "shot010.0021-0025"]
    first = jobs[0][1]
    assert first == {"name": "Shot 010 [1-10]", "type": "blender", "priority": 3,
                     "data": {"blend_file": "shot010.blend", "frames": "1-10", "samples": 16}}
    assert jobs[2][1]["data"]["frames"] == "21-25"
    assert JOB["data"]["frames"] == "1-25"  # the job itself is left as it was


def test_a_final_job_runs_after_every_chunk_under_the_jobs_own_id() -> None:
    job = {**JOB, "then": {"type": "example", "data": {"prompt": "encode"}, "after": ["plate"]}}
    jobs = split_job("shot010", job, 10)
    assert [job_id for job_id, _ in jobs][-1] == "shot010"
    assert jobs[-1][1] == {"type": "example", "data": {"prompt": "encode"},
                           "after": ["plate", "shot010.0001-0010", "shot010.0011-0020",
                                     "shot010.0021-0025"]}
    assert all("then" not in document for _, document in jobs)


def test_chunks_of_a_list_of_frames_and_one_frame() -> None:
    jobs = split_job("s", {"type": "blender", "data": {"frames": "1,5,10-12"}}, 2)
    assert [(job_id, doc["data"]["frames"]) for job_id, doc in jobs] == [
        ("s.0001-0005", "1,5"), ("s.0010-0011", "10-11"), ("s.0012-0012", "12")]
    assert split_job("s", {"type": "blender", "data": {"frames": 7}}, 10)[0][0] == "s.0007-0007"


@pytest.mark.parametrize(("job", "size", "field"), [
    (JOB, 0, "chunk"),
    (JOB, True, "chunk"),
    ({"type": "blender", "data": {}}, 10, "data.frames"),
    ({"type": "blender"}, 10, "data.frames"),
    ({"type": "blender", "data": {"frames": "9-1"}}, 10, "data.frames"),
    ({**JOB, "then": "encode"}, 10, "then"),
    ({**JOB, "then": {"type": "example", "after": "x"}}, 10, "then.after"),
    ({"type": "blender", "data": {"frames": f"1-{MAX_CHUNKS + 1}"}}, 1, "chunk"),
    (["not", "a", "mapping"], 10, "job"),
])
def test_what_cannot_be_split_is_named(job, size, field) -> None:
    with pytest.raises(ChunkError) as caught:
        split_job("shot010", job, size)
    assert caught.value.field == field


def test_an_id_too_long_for_its_chunks() -> None:
    with pytest.raises(ChunkError, match="is not a valid job id"):
        split_job("x" * 120, JOB, 10)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".YML"])
def test_each_chunk_is_a_valid_job_file(suffix: str) -> None:
    job = {**JOB, "not_before": "2026-11-25T02:00:00Z",
           "then": {"type": "example", "data": {"prompt": "encode"}}}
    if suffix != ".json":  # as YAML reads it: a datetime
        job = yaml.safe_load(yaml.safe_dump(job))
    for _, document in split_job("shot010", job, 10):
        raw = encode(document, suffix)
        parsed = parse_document(raw, suffix)
        check_job(parsed, registry=None)
        if suffix == ".json":
            assert json.loads(raw) == parsed
