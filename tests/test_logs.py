"""The daemon's log lines: one message, one line, whatever the input holds."""

from __future__ import annotations

import io

from loguru import logger

from kinod.logs import TEXT_FORMAT, escape_controls


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
