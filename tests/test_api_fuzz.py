"""Property-based requests over the API's whole OpenAPI schema (schemathesis): requests that
fit the schema and requests that do not. None may get a 5xx, and none may write a file
anywhere but the inbox. Bounded (a few hundred requests) and seeded, so a run repeats."""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis
import schemathesis
from schemathesis import GenerationMode

from kinod.api.server import ApiServer
from kinod.models import JobState, Sidecar
from kinod.outbox import Outbox
from tests.test_api import T0, settings_for

EXAMPLES_PER_OPERATION = 20  # per operation and generation mode: a few hundred requests
# An endless stream: its events are tested by themselves.
ENDLESS = "/api/v1/events"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` but the inbox, and its size and mtime."""
    found = {}
    for folder, folders, names in os.walk(root):
        if Path(folder) == root:
            folders[:] = [f for f in folders if f != "inbox"]
        for name in [*names, *folders]:
            st = os.lstat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return found


def test_no_request_gets_a_server_error_or_writes_outside_the_inbox(kinod_root: Path) -> None:
    outbox = Outbox(kinod_root / "outbox")
    for n, state in enumerate(JobState):  # ids the generator may hit: "1", "2", ...
        outbox.write(Sidecar(id=str(n + 1), type="scripted", state=state, created_at=T0,
                             updated_at=T0))
    frames = kinod_root / "data" / "frames" / "1"
    frames.mkdir(parents=True)
    (frames / "out.png").write_bytes(b"png")
    settings = settings_for(kinod_root)
    before = tree(kinod_root)
    neighbours = set(os.listdir(kinod_root.parent))
    server = ApiServer(settings).start()
    requests = 0
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").exclude(
            path=ENDLESS)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
                                     database=None, derandomize=True,
                                     suppress_health_check=list(hypothesis.HealthCheck),
                                     phases=[hypothesis.Phase.explicit,
                                             hypothesis.Phase.generate])
                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                def call(case: schemathesis.Case) -> None:
                    nonlocal requests
                    response = case.call(base_url=server.url, timeout=10)
                    requests += 1
                    assert response.status_code < 500, (
                        f"{case.method} {case.formatted_path}: {response.status_code} "
                        f"{response.text[:500]}")

                try:
                    call()
                except hypothesis.errors.Unsatisfiable:
                    # An operation without parameters has no wrong ones to send.
                    assert mode is GenerationMode.NEGATIVE, operation.label
    finally:
        server.stop()
    print(f"{requests} requests over {len(operations)} operations")
    assert requests >= 200
    assert any(name.endswith(".json") for name in os.listdir(kinod_root / "inbox"))
    assert tree(kinod_root) == before
    assert set(os.listdir(kinod_root.parent)) == neighbours
