"""Every example in docs/ runs: each page's ```bash and ```python blocks, in order, in a
folder of its own, against the real daemon where the page starts one.

Sybil reads the pages. What a page may say to the runner, in HTML comments (invisible on
the site):

- ``<!-- docs-test: farm -->`` (anywhere): before the first example, ``kinod init`` makes
  the page's folder a farm (node ``docs``); ``<!-- docs-test: daemon -->`` also starts
  ``kinod run`` there, with the API on the page's port, stopped after the last example.
- ``<!-- file: PATH -->`` before a block: the block is written to PATH (a job file, a
  plugin), not run; later examples use it.
- ``<!-- background: TEXT -->`` before a ```bash block: it runs in the background (a
  daemon, a second node) until the page ends; the runner waits until its output shows
  TEXT.
- ``<!-- skip: next "why" -->`` (sybil's own): the next example needs what a test cannot
  have (root and systemd, a GPU and ComfyUI, a file server); the reason is reported.

Each ```bash block runs with ``bash -euo pipefail`` in the page's folder (a ``cd`` carries
over to the next block) with ``.venv/bin`` first on ``PATH``; ```python blocks share one
namespace per page and run in the same folder. ``127.0.0.1:8000`` and ``localhost:8000``
in a page stand for the page's own free port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import SkipTest

import pytest
from sybil import Example, Region, Sybil
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer
from sybil.parsers.markdown.skip import SkipParser

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BIN = Path(sys.executable).parent
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
RUNNABLE = ("bash", "python")
# Code blocks that are shell or Python under another name would escape the runner.
FORBIDDEN = ("sh", "shell", "console", "py", "python3", "zsh")
BLOCK_TIMEOUT_S = 90
READY_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Farm:
    """One page's folder, its port, and the processes its examples started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cwd = root
        self.port = _free_port()
        self.pending_file: Path | None = None
        self.background = False
        self.ready_text = ""
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.skipped: list[str] = []
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        KINOD_LOG_LEVEL="INFO", NO_COLOR="1", COLUMNS="120")
        for name in ("KINOD_CONFIG", "KINOD_WATCH", "KINOD_POLL_INTERVAL_S", "KINOD_NODE"):
            self.env.pop(name, None)

    def local(self, text: str) -> str:
        return re.sub(r"(127\.0\.0\.1|localhost):8000\b", rf"\g<1>:{self.port}", text)

    # --- what a block does --------------------------------------------------------------

    def write_pending(self, source: str) -> bool:
        if self.pending_file is None:
            return False
        path = self.cwd / self.pending_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.local(source))
        self.pending_file = None
        return True

    def run_bash(self, source: str, where: str) -> None:
        script = self.local(source)
        cwd_file = self.root / ".docs-test-cwd"
        if self.background:
            self.background = False
            self.start(script, where)
            return
        wrapped = f'trap \'pwd > "{cwd_file}"\' EXIT\n{script}'
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", wrapped], cwd=self.cwd,
                              env=self.env, capture_output=True, timeout=BLOCK_TIMEOUT_S)
        if proc.returncode != 0:
            raise AssertionError(
                f"{where}: exit status {proc.returncode}\n--- block\n{script}\n--- stdout\n"
                f"{proc.stdout.decode(errors='replace')}\n--- stderr\n"
                f"{proc.stderr.decode(errors='replace')}\n{self.logs()}")
        if cwd_file.exists():
            self.cwd = Path(cwd_file.read_text().strip())

    def start(self, script: str, where: str) -> None:
        log = self.root / f".docs-test-bg-{len(self.processes)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.cwd, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.processes.append((proc, log))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.ready_text not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{where}: never said {self.ready_text!r}\n"
                                     f"{log.read_text(errors='replace')}")
            time.sleep(0.05)

    def run_python(self, source: str, namespace: dict[str, object], where: str) -> None:
        code = compile(self.local(source), where, "exec")
        before = Path.cwd()
        os.chdir(self.cwd)
        try:
            exec(code, namespace)
        finally:
            os.chdir(before)

    # --- the page's own daemon, and the end ----------------------------------------------

    def set_up(self, mode: str) -> None:
        subprocess.run([str(BIN / "kinod"), "init", str(self.root)], check=True,
                       capture_output=True, env=self.env)
        config = self.root / "config.yaml"
        text = config.read_text()
        text = re.sub(r"(?m)^node: null", "node: docs", text)
        if mode == "daemon":
            text = re.sub(r"(?m)^(\s+)listen: null", rf"\g<1>listen: 127.0.0.1:{self.port}",
                          text)
        text = re.sub(r"(?m)^settle_s: [0-9.]+", "settle_s: 0.2", text)
        text = re.sub(r"(?m)^rescan_interval_s: [0-9.]+", "rescan_interval_s: 2", text)
        config.write_text(text)
        if mode == "daemon":
            self.ready_text = "kinod ready"
            self.start(f"exec {BIN / 'kinod'} run", "the page's daemon")

    def logs(self) -> str:
        return "".join(f"--- background {i}\n{log.read_text(errors='replace')[-4000:]}\n"
                       for i, (_, log) in enumerate(self.processes) if log.exists())

    def close(self) -> None:
        for proc, _ in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc, _ in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# --- sybil's parsers --------------------------------------------------------------------


def _code_blocks(document) -> Iterator[Region]:
    for region in FencedCodeBlockLexer(language=r".+")(document):
        info = region.lexemes["language"].split()
        region.parsed = (info[0] if info else "", region.lexemes["source"])
        region.evaluator = _evaluate_code
        yield region


def _directives(name: str):
    def parse(document) -> Iterator[Region]:
        for region in DirectiveInHTMLCommentLexer(directive=name, arguments=".*?")(document):
            region.parsed = (name, (region.lexemes.get("arguments") or "").strip())
            region.evaluator = _evaluate_directive
            yield region
    return parse


def _farm(example: Example) -> Farm:
    return example.namespace["__farm__"]  # type: ignore[return-value]


def _evaluate_directive(example: Example) -> None:
    farm = _farm(example)
    name, argument = example.parsed
    if name == "file":
        farm.pending_file = Path(argument)
    elif name == "background":
        farm.background, farm.ready_text = True, argument


def _evaluate_code(example: Example) -> None:
    farm = _farm(example)
    language, source = example.parsed
    path = Path(example.path)
    where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{example.line}"
    if farm.write_pending(str(source)):
        return
    if language == "bash":
        farm.run_bash(str(source), where)
    elif language == "python":
        farm.run_python(str(source), example.namespace, where)


SYBIL = Sybil(parsers=[SkipParser(), _code_blocks, _directives("file"),
                       _directives("background")])


def _name(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_example_on_the_page_runs(page: Path, tmp_path: Path) -> None:
    document = SYBIL.parse(page)
    text = page.read_text()
    farm = Farm(tmp_path)
    document.namespace["__farm__"] = farm
    setup = re.search(r"<!-- docs-test: (farm|daemon) -->", text)
    try:
        if setup:
            farm.set_up(setup.group(1))
        for example in document:
            try:
                example.evaluate()
            except SkipTest as exc:
                farm.skipped.append(f"line {example.line}: {exc}")
    finally:
        farm.close()
    assert farm.pending_file is None, "a file: marker with no block after it"
    assert not farm.background, "a background: marker with no bash block after it"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_example_hides_from_the_runner(page: Path) -> None:
    """Shell and Python blocks are spelled ```bash and ```python, so every one of them
    runs (or is skipped with a reason, which sybil's skip needs to be said)."""
    fences = re.findall(r"(?m)^\s*```([\w+-]*)", page.read_text())
    hidden = [lang for lang in fences if lang in FORBIDDEN]
    assert not hidden, f"code blocks the runner would not run: {hidden}"
    skips = re.findall(r"<!-- skip: next(.*?)-->", page.read_text())
    assert all(reason.strip() for reason in skips), "every skip says why"


def test_the_runner_runs_bash_python_files_and_background_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        <!-- file: sub/hello.txt -->
        ```text
        hi from a file
        ```

        ```bash
        cd sub && test "$(cat hello.txt)" = "hi from a file"
        ```

        ```bash
        test -f hello.txt
        ```

        <!-- background: up -->
        ```bash
        echo up; sleep 60
        ```

        ```python
        from pathlib import Path
        seen = Path("hello.txt").read_text()
        ```

        <!-- skip: next "needs a GPU" -->
        ```bash
        exit 1
        ```
        """))
    document = SYBIL.parse(page)
    farm = Farm(tmp_path)
    document.namespace["__farm__"] = farm
    try:
        for example in document:
            try:
                example.evaluate()
            except SkipTest as exc:
                farm.skipped.append(str(exc))
        assert document.namespace["seen"] == "hi from a file\n"
        assert farm.skipped == ["needs a GPU"]
        assert len(farm.processes) == 1 and farm.processes[0][0].poll() is None
    finally:
        farm.close()
    assert farm.processes[0][0].returncode is not None


def test_a_failing_bash_block_fails_with_its_output(tmp_path: Path) -> None:
    farm = Farm(tmp_path)
    with pytest.raises(AssertionError, match="exit status 3"):
        farm.run_bash("echo about to fail; exit 3", "page.md:1")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_port_in_a_page_is_the_pages_own(tmp_path: Path) -> None:
    farm = Farm(tmp_path)
    assert farm.local("curl http://127.0.0.1:8000/healthz") == \
        f"curl http://127.0.0.1:{farm.port}/healthz"
