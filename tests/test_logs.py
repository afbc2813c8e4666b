"""The daemon's log lines: one message, one line, whatever the input holds."""

from __future__ import annotations

import errno
import io
import os
import threading
from pathlib import Path

import pytest
from loguru import logger

from kinod.logs import (
    TEXT_FORMAT,
    add_job_log_sink,
    append_job_line,
    escape_controls,
    log_job_event,
)


def test_control_characters_in_a_message_are_escaped() -> None:
    out = io.StringIO()
    undecodable = b"\xff".decode("utf-8", "surrogateescape")  # a file name's stray byte
    handler = logger.add(out, format=TEXT_FORMAT, colorize=False)
    try:
        logger.patch(escape_controls).info(
            "{}: a folder", f"inbox/x\n2001-01-01 | ERROR | forged\x1b[2J\r\t{undecodable}.yaml")
    finally:
        logger.remove(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        r"inbox/x\n2001-01-01 | ERROR | forged\x1b[2J\r\t\udcff.yaml: a folder"), lines
    assert "\x1b" not in out.getvalue()


def test_plain_text_and_unicode_pass_unchanged() -> None:
    record = {"message": "job ünï-ß 日本 ended: ok"}
    escape_controls(record)
    assert record["message"] == "job ünï-ß 日本 ended: ok"


def _plugin_call(token: str) -> None:
    raise RuntimeError(f"the server refused a token of {len(token)} characters")


def test_a_traceback_in_a_jobs_log_never_shows_local_values(tmp_path: Path) -> None:
    sink = add_job_log_sink(tmp_path)
    try:
        token = "s3cr3t-TOKEN"  # a plugin's credential, in the failing frame and the caller's
        try:
            _plugin_call(token)
        except RuntimeError:
            logger.bind(job_id="j1").exception("job j1: the plugin raised")
    finally:
        logger.remove(sink)
    log = (tmp_path / "j1.log").read_text()
    assert "job j1: the plugin raised" in log
    assert "RuntimeError: the server refused a token of 12 characters" in log  # still there
    assert "s3cr3t-TOKEN" not in log


def test_a_link_planted_as_a_jobs_log_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    os.symlink(victim, outbox / "j1.log")
    with pytest.raises(OSError) as info:
        append_job_line(outbox / "j1.log", "a line\n")
    assert info.value.errno == errno.ELOOP
    log_job_event(outbox, "j1", "INFO", "job j1 queued")  # the line is lost, nothing raised
    assert victim.read_text() == "precious\n"
    assert os.readlink(outbox / "j1.log") == str(victim)


def test_a_fifo_planted_as_a_jobs_log_never_blocks_the_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "j1.log")
    writer = threading.Thread(target=log_job_event, args=(tmp_path, "j1", "INFO", "queued"),
                              name="log-writer")
    writer.start()
    writer.join(5)
    blocked = writer.is_alive()
    if blocked:  # let it go: a reader opens the FIFO
        os.close(os.open(tmp_path / "j1.log", os.O_RDONLY | os.O_NONBLOCK))
        writer.join(5)
    assert not blocked


def test_a_jobs_log_is_appended_to_line_by_line(tmp_path: Path) -> None:
    append_job_line(tmp_path / "j1.log", "one\n")
    append_job_line(tmp_path / "j1.log", "two\n")
    assert (tmp_path / "j1.log").read_text() == "one\ntwo\n"
