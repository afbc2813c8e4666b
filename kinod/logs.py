"""Logging: the daemon's log on stderr, and each job's own lines in ``outbox/<id>.log``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from loguru import logger

# A newline in a file name or a job's key would let input forge log lines, an escape
# sequence would repaint an operator's terminal: messages show control characters escaped.
_ESCAPED = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPED.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"
JOB_LINE_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSS[Z]!UTC} {level: <7} {message}"


# syslog priorities, as journald reads them from a "<N>" at the start of a line.
JOURNAL_PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4,
                    "ERROR": 3, "CRITICAL": 2}


# The least level the daemon's own log shows (setup_logging sets it).
_daemon_level_no = 0


def setup_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Send the daemon's log to stderr, as plain text or one JSON object a line. When stderr
    is the journal, text lines carry a syslog priority instead of a time (the journal keeps
    its own) and no colours."""
    global _daemon_level_no
    _daemon_level_no = logger.level(level.upper()).no
    logger.remove()
    logger.configure(patcher=escape_controls)
    # diagnose=False: tracebacks never print local variables (job data, paths, settings).
    if log_format == "json":
        logger.add(sys.stderr, level=level, serialize=True, diagnose=False)
    elif stderr_is_journal():
        logger.add(sys.stderr, level=level, format=_journal_format, colorize=False,
                   diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=TEXT_FORMAT, colorize=None, diagnose=False)
    # Plugins that log with the standard library end up here too.
    logging.basicConfig(handlers=[_InterceptHandler()], level=0, force=True)
    # apscheduler reports every run of the periodic rescan at INFO; watchdog every file event
    # at DEBUG (a cost paid per job even when nobody reads DEBUG); the HTTP and websocket
    # libraries (the sdxl plugin's) every request and frame, into the job's log; Pillow every
    # PNG chunk it reads (14 lines a frame checked, more CPU than decoding the frame).
    for name in ("apscheduler", "watchdog", "httpx", "httpcore", "websockets", "aiohttp",
                 "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """systemd says so in JOURNAL_STREAM ("device:inode" of the stream it connected)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def _journal_format(record) -> str:
    # "\<": loguru would take "<6>" for a colour tag.
    return f"\\<{JOURNAL_PRIORITY.get(record['level'].name, 6)}>{{message}}\n{{exception}}"


def escape_controls(record) -> None:
    """One message, one line of printable text (undecodable bytes of a file name too)."""
    record["message"] = printable(record["message"])


def printable(message: str) -> str:
    if message.isprintable():  # the common case: no control character, no lone surrogate
        return message
    message = message.translate(_ESCAPED)
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message


def log_job_event(outbox: str | Path, job_id: str, level: str, message: str) -> None:
    """A line kinod writes about a job: into the job's log, and into the daemon's where its
    level shows it. The job's line is written here, not through loguru, whose record (frame,
    context, time zone, handlers) costs more than the rest of a state change's logging,
    three times a job."""
    message = printable(message)
    with contextlib.suppress(OSError):  # a full disk: the sidecar says it, the line is lost
        append_job_line(f"{outbox}/{job_id}.log", f"{_utc_stamp()} {level: <7} {message}\n")
    number = _LEVEL_NO.get(level)
    if (number if number is not None else logger.level(level).no) >= _daemon_level_no:
        # job_id for the daemon's JSON lines; written=True keeps it out of the job's log.
        logger.bind(job_id=job_id, written=True).log(level, "{}", message)


# The numbers of the levels kinod writes job events at (loguru's own lookup takes a lock).
_LEVEL_NO = {name: logger.level(name).no for name in ("DEBUG", "INFO", "WARNING", "ERROR")}

_last_second: tuple[int, str] = (0, "")


def _utc_stamp() -> str:
    """Now as JOB_LINE_FORMAT writes it; the seconds' text is made once a second."""
    global _last_second
    now = time.time()
    second = int(now)
    if _last_second[0] != second:
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_last_second[1]}.{int((now - second) * 1000):03d}Z"


# One O_APPEND write per line: no buffered file object to build for each line, and lines
# from several threads never interleave. The outbox may be writable by others: a link
# planted as a job's log is never written through (ELOOP), nor does a FIFO block (ENXIO).
_JOB_LOG_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                  | os.O_CLOEXEC)


def append_job_line(path: str | Path, line: str) -> None:
    fd = os.open(path, _JOB_LOG_FLAGS, 0o644)
    try:
        os.write(fd, line.encode("utf-8", "backslashreplace"))
    finally:
        os.close(fd)


def add_job_log_sink(outbox: Path) -> int:
    """Copy every log line bound to a job (``job_id`` in extra) into ``outbox/<id>.log``.

    The id was validated before any line is bound to it, so it is a safe file name.
    """

    def sink(message) -> None:
        append_job_line(outbox / f"{message.record['extra']['job_id']}.log", message)

    # diagnose=False: a plugin's traceback must not print its local variables (tokens,
    # passwords, job data) into a file everyone who submits jobs can read.
    return logger.add(sink, level="DEBUG", format=JOB_LINE_FORMAT,
                      filter=_for_job_log, catch=True, diagnose=False)


def _for_job_log(record) -> bool:
    extra = record["extra"]
    return "job_id" in extra and "written" not in extra


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())
