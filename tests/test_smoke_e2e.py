import json
from pathlib import Path

from tests.helpers import DaemonProcess, drop_job, kinod_cli, read_sidecar, write_config


def test_seed_example_job_succeeds_as_json_and_yaml(daemon: DaemonProcess) -> None:
    daemon.start()
    job = {"type": "example", "data": {"prompt": "test prompt", "steps": 20}}
    daemon.drop("as_json.json", job)
    daemon.drop("as_yaml.yaml", job)
    for job_id in ("as_json", "as_yaml"):
        sidecar = daemon.wait_state(job_id, "succeeded", "failed", "stopped")
        assert sidecar["state"] == "succeeded", sidecar
        assert sidecar["progress"] == 100
        assert sidecar["schema"] == "kinod.sidecar/1"
        assert sidecar["task"] == job
        assert sidecar["result"]["steps"] == 20
    assert daemon.stop() == 0


def test_log_format_json_writes_one_json_object_a_line(kinod_root: Path) -> None:
    config = write_config(kinod_root)
    drop_job(kinod_root / "inbox", "one.json", {"type": "example", "data": {"prompt": "p",
                                                                          "steps": 1}})
    result = kinod_cli("run", "--config", str(config), "--log-format", "json", "--burst")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    messages = [r["record"]["message"] for r in records]
    assert any("kinod ready" in m for m in messages), messages
    assert any("job one running -> succeeded" in m for m in messages), messages
    assert read_sidecar(kinod_root / "outbox", "one")["state"] == "succeeded"
