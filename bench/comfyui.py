"""kinod's comfyui plugin against a direct feeder, on ComfyUI test peers of a fixed speed.

    python bench/comfyui.py [--jobs 200] [--servers 1,2,4,8] [--run-time-s 0.1]
                            [--image-mb 1.5] [--latency-jobs 40] [--rounds 1]

Each server is the test peer of ``tests/comfyui_peer/`` speaking ComfyUI 0.3.64, in a process
of its own, made to take ``--run-time-s`` per prompt (a fast GPU with a turbo model) and to
write one PNG of ``--image-mb`` per prompt. Both sides run the shipped ``sdxl_txt2img``
workflow with a fresh seed per prompt, so nothing is cached.

- The feeder is the least a script can do: one websocket per server, every prompt posted up
  front (round robin), and each image fetched (``/history``, ``/view``) and written to disk as
  its prompt ends. Timed from the first post to the last image written.
- kinod is the real daemon (``kinod run``, ``workers`` 3 per server + 2, ``queue_ahead`` 1),
  the jobs renamed into its inbox at once. Timed from the first rename until the last final
  sidecar is seen (inotify on the outbox).
- Latency: one server, jobs dropped one at a time; from the rename to the server receiving
  ``POST /prompt``, and from the server's end of the prompt to the final sidecar, image saved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from farm import BENCH, IN_MOVED_TO, TERMINAL, Daemon, Inotify, machine, make_farm, read_sidecar

REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # the test peer lives with the tests

from tests.comfyui_peer import MODERN, ComfyUITestServer  # noqa: E402

WORKFLOW = REPO / "workflows" / "sdxl_txt2img.json"
SMALL = {"5.width": 64, "5.height": 64, "3.steps": 1}


class TimedPeer(ComfyUITestServer):
    """The test peer, noting when each prompt was posted and when the server ended it."""

    def __init__(self, run_time_s: float, image_bytes: int) -> None:
        super().__init__(version=MODERN, step_delay_s=0.0)
        self.run_time_s = run_time_s
        self.output_bytes = image_bytes
        self.posted_at: dict[str, float] = {}
        self.ended_at: dict[str, float] = {}

    async def _post_prompt(self, request: Any) -> Any:
        at = time.perf_counter()
        answer = await super()._post_prompt(request)
        if answer.status == 200:
            self.posted_at[json.loads(answer.text)["prompt_id"]] = at
        return answer

    async def _execute(self, item: tuple[Any, ...]) -> None:
        await super()._execute(item)
        self.ended_at[item[1]] = time.perf_counter()

    def prefix_of(self, prompt_id: str) -> str:
        return self.prompts[prompt_id]["9"]["inputs"]["filename_prefix"]


def _serve(conn: Any, run_time_s: float, image_bytes: int) -> None:
    """A peer's process: serve until told to stop; say when prompts were posted and ended."""
    peer = TimedPeer(run_time_s, image_bytes).start()
    conn.send(peer.url)
    while conn.recv() != "stop":
        conn.send((peer.posted_at, peer.ended_at,
                   {pid: peer.prefix_of(pid) for pid in peer.ended_at}))
    peer.stop()
    conn.send(None)


class PeerProcess:
    """A TimedPeer in a process of its own: peers never share a GIL with each other, with the
    feeder, or with this script's watching of the outbox."""

    def __init__(self, run_time_s: float, image_bytes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, run_time_s, image_bytes),
                                        daemon=True)
        self._process.start()
        child.close()
        self.url: str = self._conn.recv()

    def times(self) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
        """(posted at, ended at, SaveImage prefix), by prompt id."""
        self._conn.send("times")
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._conn.recv()
        self._process.join(30)


def graph(prefix: str) -> dict[str, Any]:
    workflow = json.loads(WORKFLOW.read_text())
    for key, value in {**SMALL, "9.filename_prefix": prefix}.items():
        node, name = key.split(".")
        workflow[node]["inputs"][name] = value
    workflow["3"]["inputs"]["seed"] = random.randrange(2**53)
    return workflow


# --- the feeder -------------------------------------------------------------------------------


async def feed(peers: list[PeerProcess], n: int, out: Path) -> float:
    """Seconds from the first POST to the last image written."""
    import httpx
    from websockets.asyncio.client import connect

    out.mkdir(parents=True)
    left = n
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=60) as http:
        async def save(url: str, prompt_id: str) -> None:
            nonlocal left
            history = (await http.get(f"{url}/history/{prompt_id}")).json()[prompt_id]
            for output in history["outputs"].values():
                for image in output.get("images", []):
                    data = (await http.get(f"{url}/view", params=image)).content
                    (out / image["filename"]).write_bytes(data)
            left -= 1
            if not left:
                done.set()

        async def listen(url: str, ws: Any, tasks: set[asyncio.Task]) -> None:
            async for raw in ws:
                if not isinstance(raw, str):
                    continue
                message = json.loads(raw)
                data = message.get("data") or {}
                if message["type"] == "executing" and data.get("node") is None and \
                        data.get("prompt_id"):
                    task = asyncio.create_task(save(url, data["prompt_id"]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        ids = {peer.url: str(uuid.uuid4()) for peer in peers}
        sockets = {url: await connect(url.replace("http", "ws", 1) + f"/ws?clientId={cid}",
                                      max_size=None) for url, cid in ids.items()}
        tasks: set[asyncio.Task] = set()
        listeners = [asyncio.create_task(listen(url, ws, tasks)) for url, ws in sockets.items()]
        bodies = [graph(f"feed{i:04d}") for i in range(n)]
        started = time.perf_counter()
        for i, body in enumerate(bodies):
            url = peers[i % len(peers)].url
            answer = await http.post(f"{url}/prompt", json={"prompt": body,
                                                             "client_id": ids[url]})
            answer.raise_for_status()
        await asyncio.wait_for(done.wait(), 600)
        ended = time.perf_counter()
        for listener in listeners:
            listener.cancel()
        for ws in sockets.values():
            await ws.close()
    return ended - started


# --- kinod ------------------------------------------------------------------------------------


def farm(root: Path, peers: list[PeerProcess]) -> Path:
    (root / "workflows").mkdir(parents=True)
    (root / "workflows" / WORKFLOW.name).write_bytes(WORKFLOW.read_bytes())
    return make_farm(root, workers=3 * len(peers) + 2, plugins={"comfyui": {
        "comfyui_urls": [peer.url for peer in peers], "queue_ahead": 1,
        "workflows": str(root / "workflows")}})


def job(prefix: str) -> str:
    return json.dumps({"type": "comfyui", "data": {
        "workflow": "sdxl_txt2img", "inputs": {**SMALL, "9.filename_prefix": prefix}}})


class Outbox:
    """When each job's final sidecar was first seen (inotify on the outbox)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ended: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self._inotify = Inotify()
        self._inotify.watch(folder, IN_MOVED_TO)

    def wait(self, ids: set[str], deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while not ids <= self.ended.keys():
            if time.monotonic() > deadline:
                missing = sorted(ids - self.ended.keys())
                raise RuntimeError(f"{len(missing)} jobs did not end, e.g. {missing[:3]}")
            for _, name in self._inotify.read(1.0):
                job_id = name[:-5]
                if name.endswith(".json") and job_id in ids and job_id not in self.ended:
                    sidecar = read_sidecar(self.folder / name)
                    if sidecar is not None and sidecar.get("state") in TERMINAL:
                        self.ended[job_id] = time.perf_counter()
                        self.states[job_id] = sidecar["state"]

    def close(self) -> None:
        self._inotify.close()


def stage(root: Path, prefixes: list[str]) -> Path:
    staged = root / "staged"
    staged.mkdir()
    for prefix in prefixes:
        (staged / f"{prefix}.json").write_text(job(prefix))
    return staged


def kinod_burst(root: Path, peers: list[PeerProcess], n: int) -> float:
    """Seconds from the first job renamed into the inbox to the last final sidecar."""
    config = farm(root, peers)
    ids = [f"job{i:04d}" for i in range(n)]
    staged = stage(root, ids)
    with Daemon(config) as daemon:
        daemon.ready()
        outbox = Outbox(root / "outbox")
        started = time.perf_counter()
        for job_id in ids:
            os.rename(staged / f"{job_id}.json", root / "inbox" / f"{job_id}.json")
        outbox.wait(set(ids), 600)
        outbox.close()
    failed = [i for i, state in outbox.states.items() if state != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}: "
                           f"{read_sidecar(root / 'outbox' / f'{failed[0]}.json')}")
    return max(outbox.ended.values()) - started


def kinod_latency(root: Path, peer: PeerProcess, n: int) -> tuple[list[float], list[float]]:
    """Per job, one at a time: ms from the rename to POST /prompt, and from the server's end
    of the prompt to the final sidecar."""
    config = farm(root, [peer])
    ids = [f"lat{i:04d}" for i in range(n)]
    staged = stage(root, ids)
    dropped: dict[str, float] = {}
    with Daemon(config) as daemon:
        daemon.ready()
        outbox = Outbox(root / "outbox")
        for job_id in ids:
            time.sleep(random.uniform(0.0, 0.02))  # drops fall anywhere, not in step
            dropped[job_id] = time.perf_counter()
            os.rename(staged / f"{job_id}.json", root / "inbox" / f"{job_id}.json")
            outbox.wait({job_id}, 60)
        outbox.close()
    posted_at, ended_at, prefixes = peer.times()  # perf_counter: one clock for all processes
    by_prefix = {prefix: pid for pid, prefix in prefixes.items()}
    to_post = [(posted_at[by_prefix[i]] - dropped[i]) * 1000 for i in ids]
    to_saved = [(outbox.ended[i] - ended_at[by_prefix[i]]) * 1000 for i in ids]
    return to_post, to_saved


# --- the run ----------------------------------------------------------------------------------


def peers_for(count: int, args: argparse.Namespace) -> list[PeerProcess]:
    return [PeerProcess(args.run_time_s, int(args.image_mb * 1e6)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--servers", default="1,2,4,8")
    parser.add_argument("--run-time-s", type=float, default=0.1)
    parser.add_argument("--image-mb", type=float, default=1.5)
    parser.add_argument("--latency-jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1,
                        help="each size this often, feeder and kinod in turn; the best kept")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kinod-comfyui-bench-"))
    print(f"{machine(work)}; `python bench/comfyui.py {' '.join(sys.argv[1:])}`", flush=True)
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    rates: dict[int, tuple[float, float]] = {}
    for count in (int(s) for s in args.servers.split(",")):
        best_feed = best_kinod = 0.0
        for n in range(args.rounds):
            peers = peers_for(count, args)
            try:
                feed_s = asyncio.run(feed(peers, args.jobs, work / f"feed-{count}-{n}"))
            finally:
                for peer in peers:
                    peer.stop()
            peers = peers_for(count, args)
            try:
                kinod_s = kinod_burst(work / f"kinod-{count}-{n}", peers, args.jobs)
            finally:
                for peer in peers:
                    peer.stop()
            best_feed = max(best_feed, args.jobs / feed_s)
            best_kinod = max(best_kinod, args.jobs / kinod_s)
            print(f"  {count} server(s), round {n + 1}: feeder {args.jobs / feed_s:.2f} "
                  f"jobs/s, kinod {args.jobs / kinod_s:.2f} jobs/s", flush=True)
        rates[count] = (best_feed, best_kinod)
    print("\n| servers | feeder (jobs/s) | kinod (jobs/s) | kinod / feeder | target |")
    print("| --- | --- | --- | --- | --- |")
    for count, (feed_rate, kinod_rate) in rates.items():
        ratio = kinod_rate / feed_rate
        print(f"| {count} | {feed_rate:.2f} | {kinod_rate:.2f} | {ratio:.3f} | "
              f"≥ 0.97: {'met' if ratio >= 0.97 else 'missed'} |")
    if 1 in rates and 8 in rates:
        scale = rates[8][1] / rates[1][1]
        print(f"\nkinod, 8 servers vs 1: {scale:.2f}x (target ≥ 7.5: "
              f"{'met' if scale >= 7.5 else 'missed'}); feeder: "
              f"{rates[8][0] / rates[1][0]:.2f}x")
    if args.latency_jobs:
        [peer] = peers_for(1, args)
        try:
            to_post, to_saved = kinod_latency(work / "latency", peer, args.latency_jobs)
        finally:
            peer.stop()
        for what, values, bound in (("drop -> POST /prompt", to_post, 10),
                                    ("prompt end -> final sidecar, image saved", to_saved, 50)):
            p50 = statistics.median(values)
            print(f"{what}: p50 {p50:.1f} ms, max {max(values):.1f} ms "
                  f"({len(values)} jobs; target p50 < {bound} ms: "
                  f"{'met' if p50 < bound else 'missed'})")


if __name__ == "__main__":
    main()
