"""``"chunk": N`` on ``POST /api/v1/generator/tasks``, in-process, on a folder without a
daemon: what it writes into the inbox, and what it refuses before writing anything."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from kinod.api.server import ApiServer
from kinod.config import load_settings
from kinod.models import JobState, Sidecar
from kinod.outbox import Outbox
from tests.helpers import WORKING_PLUGINS, write_config

TASKS = "/api/v1/generator/tasks"
RENDER = {"name": "Shot 010", "type": "blender",
          "data": {"blend_file": "shot010.blend", "frames": "1-5"}}


@pytest.fixture
def api(kinod_root: Path) -> Iterator[httpx.Client]:
    settings = load_settings(write_config(kinod_root, plugin_dirs=[str(WORKING_PLUGINS)],
                                          http={"listen": "127.0.0.1:0"}))
    server = ApiServer(settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client
    finally:
        server.stop()


def inbox_jobs(root: Path) -> dict[str, dict]:
    return {name.removesuffix(".json"): json.loads((root / "inbox" / name).read_text())
            for name in os.listdir(root / "inbox") if name.endswith(".json")}


def test_chunk_writes_one_task_per_chunk_and_the_then_task(api: httpx.Client,
                                                           kinod_root: Path) -> None:
    body = {**RENDER, "id": "shot010", "chunk": 2, "start": True, "priority": 4,
            "then": {"type": "example", "data": {"prompt": "encode"}}}

    answer = api.post(TASKS, json=body)

    assert answer.status_code == 201, answer.text
    ids = ["shot010.0001-0002", "shot010.0003-0004", "shot010.0005-0005", "shot010"]
    tasks = answer.json()["tasks"]
    assert [t["id"] for t in tasks] == ids
    assert all(t["state"] == "queued" and t["schema"] == "kinod.sidecar/1" for t in tasks)
    written = inbox_jobs(kinod_root)
    assert sorted(written) == sorted(ids)
    assert written["shot010.0003-0004"] == {
        "name": "Shot 010 [3-4]", "type": "blender", "priority": 4, "hold": False,
        "data": {"blend_file": "shot010.blend", "frames": "3-4"}}
    assert written["shot010"] == {"type": "example", "data": {"prompt": "encode"},
                                  "after": ids[:3], "hold": False}


def test_chunks_are_held_like_any_task_and_get_a_free_id(api: httpx.Client,
                                                         kinod_root: Path) -> None:
    answer = api.post(TASKS, json={**RENDER, "chunk": 10})
    assert answer.status_code == 201, answer.text
    [task] = answer.json()["tasks"]
    assert task["id"] == "1.0001-0005" and task["state"] == "held"
    assert inbox_jobs(kinod_root)["1.0001-0005"]["hold"] is True


@pytest.mark.parametrize(("body", "field"), [
    ({**RENDER, "chunk": 0}, "chunk"),
    ({**RENDER, "then": {"type": "example", "data": {"prompt": "x"}}}, "then"),
    ({**RENDER, "data": {"blend_file": "a.blend"}, "chunk": 2}, "data.frames"),
    ({**RENDER, "data": {"blend_file": "a.blend", "frames": "9-1"}, "chunk": 2}, "data.frames"),
    ({**RENDER, "chunk": 2, "then": {"type": "example", "data": {"steps": 2}}},
     "then.data.prompt"),
    ({**RENDER, "chunk": 2, "then": {"type": "nope"}}, "then.type"),
    ({**RENDER, "chunk": 2, "then": {"type": "example", "priority": "high",
                                     "data": {"prompt": "x"}}}, "then.priority"),
    ({**RENDER, "chunk": 2, "data": {"frames": "1-5"}}, "data.blend_file"),
])
def test_what_cannot_be_chunked_is_refused_and_nothing_written(
        api: httpx.Client, kinod_root: Path, body: dict, field: str) -> None:
    answer = api.post(TASKS, json={**body, "id": "shot"})
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["error"]["fields"], answer.json()
    assert inbox_jobs(kinod_root) == {}


def test_no_chunk_is_written_while_one_of_them_still_runs(api: httpx.Client,
                                                          kinod_root: Path) -> None:
    now = datetime.now(UTC)
    Outbox(kinod_root / "outbox").write(Sidecar(id="shot.0003-0004", state=JobState.RUNNING,
                                                created_at=now, updated_at=now))
    answer = api.post(TASKS, json={**RENDER, "id": "shot", "chunk": 2})
    assert answer.status_code == 409, answer.text
    assert "shot.0003-0004 is running" in answer.json()["error"]["message"]
    assert inbox_jobs(kinod_root) == {}


def test_a_task_without_chunk_is_answered_as_before(api: httpx.Client) -> None:
    answer = api.post(TASKS, json={"type": "example", "data": {"prompt": "x"}})
    assert answer.status_code == 201 and answer.json()["id"] == "1"
    assert answer.headers["location"] == f"{TASKS}/1"


def test_the_schema_documents_chunk_then_and_the_list_answer(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    create = schema["components"]["schemas"]["TaskCreate"]["properties"]
    assert create["chunk"]["anyOf"][0]["minimum"] == 1 and "then" in create
    answer = schema["paths"][TASKS]["post"]["responses"]["201"]["content"]["application/json"]
    refs = json.dumps(answer["schema"])
    assert "TaskBatch" in refs and "Sidecar" in refs
