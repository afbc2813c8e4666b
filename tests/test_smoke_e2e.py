from tests.helpers import DaemonProcess


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
