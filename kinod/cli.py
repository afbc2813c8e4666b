"""The ``kinod`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
import threading
from importlib.resources import files
from pathlib import Path

from loguru import logger

from kinod import __version__
from kinod.atomic_files import new_temporary, rename_noreplace
from kinod.chunks import ChunkError, encode, split_job
from kinod.config import Settings, load_settings
from kinod.errors import ConfigError, InvalidJob
from kinod.intake import InboxName, check_job, inbox_has_job, read_job_bytes
from kinod.job_document import parse_document
from kinod.job_threads import IDLE_NAME
from kinod.models import JOB_ID_RULES, Sidecar, is_valid_job_id
from kinod.plugins.plugin_loader import PluginRegistry

EXIT_OK = 0
EXIT_FAILED = 1     # a job did not succeed, a file is invalid, a plugin failed to load,
                    # or a file or folder the command needs cannot be read or written
EXIT_USAGE = 2      # bad command line or bad configuration (an inbox that is no folder)
EXIT_NOT_FOUND = 3  # no such job
EXIT_INTERRUPTED = 130

WAIT_POLL_S = 0.2

EPILOG = """exit status:
  0    success
  1    a job did not succeed, a file is invalid, a plugin failed to load, or a
       file or folder the command needs cannot be read or written
  2    bad command line or configuration (also an inbox that is missing or no folder)
  3    no such job
  130  interrupted (Ctrl-C)
"""


class _Console:
    """rich's Console, made when first used: ``kinod run`` never prints through it, and
    importing rich would cost the daemon 2 MB of memory for as long as it runs."""

    def __init__(self, **options: object) -> None:
        self._options = options
        self._console = None

    def __getattr__(self, name: str) -> object:
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._options)
        return getattr(self._console, name)


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        err.print(f"kinod: {exc.message}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.func is cmd_run:
            raise  # the daemon's own failures keep their traceback for the bug report
        # A folder that cannot be made or read: one line naming it, not a traceback.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        err.print(f"kinod: {where}{exc.strerror or exc}", markup=False)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinod", description="A file-driven job daemon for render and generation farms.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kinod {__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, func, help_text: str, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        if name != "init":
            p.add_argument("--config", type=Path, metavar="FILE",
                           help="settings file (default: $KINOD_CONFIG, else ./config.yaml)")
        return p

    p = command("run", cmd_run, "run the daemon",
                "Run the daemon in the foreground until SIGTERM or SIGINT.")
    p.add_argument("--log-format", choices=["text", "json"], help="log to stderr as text or JSON")
    p.add_argument("--log-level", help="TRACE, DEBUG, INFO, SUCCESS, WARNING or ERROR")
    p.add_argument("--burst", action="store_true",
                   help="exit once every job found has ended (for cron jobs and scripts)")

    p = command("init", cmd_init, "create the folders and a default config.yaml",
                "Create inbox/, outbox/, data/frames/, models_storage/ and a commented "
                "config.yaml in DIR. Existing files are left as they are.")
    p.add_argument("dir", nargs="?", type=Path, default=Path("."), metavar="DIR",
                   help="the folder to set up (default: the current folder)")

    p = command("submit", cmd_submit, "drop job files into the inbox",
                "Copy each FILE into the inbox atomically; the job's id is the file's stem.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="job files (<id>.yaml, .yml or .json)")
    p.add_argument("--wait", action="store_true",
                   help="follow the jobs until they end; exit 1 unless all succeeded")
    p.add_argument("--chunk", type=_chunk_size, metavar="N",
                   help="split each job's data.frames into jobs of N frames, "
                        "<id>.<first>-<last>, and drop its `then` job, <id>, after them all")

    p = command("status", cmd_status, "show jobs, or one job",
                "Show every job in the outbox, or one job's sidecar.")
    p.add_argument("id", nargs="?", metavar="ID", help="one job's id (default: every job)")
    p.add_argument("--json", action="store_true", help="print sidecars as JSON")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (or the job ends)")

    p = command("nodes", cmd_nodes, "show the daemons serving this inbox",
                "Show each node's last heartbeat, its running and queued jobs and what it "
                "serves (from <inbox>/.kinod/nodes/).")
    p.add_argument("--json", action="store_true", help="print the heartbeats as JSON")

    # stop, hold, release, pause and resume: kinod.cli_control (imported here: it uses this
    # module's helpers, so it cannot be imported while this module is still loading)
    from kinod.cli_control import add_control_commands

    add_control_commands(command)

    p = command("serve", cmd_serve, "serve the HTTP API alone, running no jobs",
                "Serve the HTTP API and dashboard on http.listen (default 127.0.0.1:8000) "
                "until SIGTERM or SIGINT: a web node beside worker nodes.")
    p.add_argument("--listen", metavar="HOST:PORT", help="where to listen (default: http.listen)")

    p = command("plugins", cmd_plugins, "list plugins and their load errors")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = command("validate", cmd_validate, "check job files without submitting them",
                "Check each FILE as the daemon would: name, syntax, keys and plugin parameters.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="job files (<id>.yaml, .yml or .json)")
    return parser


# --- settings ---------------------------------------------------------------


def _settings(args: argparse.Namespace, required: bool = True,
              overrides: dict[str, str] | None = None) -> Settings:
    """The settings file given, else ./config.yaml; commands that only read plugins and
    files (``required`` False) fall back to the defaults when there is none."""
    path = args.config or os.environ.get("KINOD_CONFIG")
    if path is None and not Path("config.yaml").exists() and not required:
        return load_settings(None, overrides=overrides)
    return load_settings(path or "config.yaml", overrides=overrides)


def _inbox(settings: Settings) -> Path:
    """The inbox, which must be a folder already: kinod never makes it (a script's
    ``mkdir`` would race it), so one that is missing is a setup mistake, told as such."""
    inbox = settings.inbox
    try:
        if stat.S_ISDIR(os.stat(inbox).st_mode):
            return inbox
        reason = "not a folder"
    except FileNotFoundError:
        reason = "no such folder (create it with `kinod init`)"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    raise ConfigError(f"inbox {inbox}: {reason}")


# --- run and init ---------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from kinod.daemon import Daemon
    from kinod.logs import add_job_log_sink, setup_logging

    options = {"log_format": args.log_format, "log_level": args.log_level}
    overrides = {k: v for k, v in options.items() if v}
    settings = _settings(args, overrides=overrides)
    setup_logging(settings.log_format, settings.log_level)
    api = None
    if settings.http.listen is not None:
        from kinod.api.server import ApiServer

        api = ApiServer(settings)  # a listen it refuses stops the start (ConfigError: 2)
    add_job_log_sink(settings.outbox)
    if api is not None:
        api.start()
    try:
        asyncio.run(Daemon(settings, reload_settings=lambda: _settings(args, overrides=overrides))
                    .run(burst=args.burst))
    finally:
        if api is not None:
            api.stop()
    _exit_without_waiting_for_plugin_threads()
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from kinod.api.server import serve
    from kinod.logs import setup_logging

    settings = _settings(args)
    listen = args.listen or settings.http.listen or "127.0.0.1:8000"
    settings = settings.model_copy(update={
        "http": settings.http.model_copy(update={"listen": listen})})
    setup_logging(settings.log_format, settings.log_level)
    _inbox(settings)
    return serve(settings)


def _exit_without_waiting_for_plugin_threads() -> None:
    """A plugin may leave threads behind (its own, or asyncio.to_thread's, which the
    interpreter joins at exit even when they are daemon threads); the daemon has handed
    its jobs back already, so it exits now rather than when they end."""
    left = [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and t.name != IDLE_NAME]
    if left:
        logger.warning("exiting without waiting for plugin threads: {}", ", ".join(left))
        logger.complete()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)


def cmd_init(args: argparse.Namespace) -> int:
    root: Path = args.dir
    for folder in ("inbox", "outbox", "data/frames", "models_storage/StableDiffusion"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    if config.exists():
        out.print(f"{config} exists; left as it is", markup=False)
    else:
        config.write_text(files("kinod").joinpath("default_config.yaml").read_text())
        out.print(f"wrote {config}", markup=False)
    out.print(f"start the daemon with: kinod run --config {config}", markup=False)
    return EXIT_OK


# --- submit and wait -------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    inbox = _inbox(settings)
    submitted: dict[str, str | None] = {}  # id -> created_at of the run before this one
    status = EXIT_OK
    for path in args.files:
        job_id, problem = _job_name(path)
        pieces: list[tuple[str, bytes]] = []  # the file's job, or its chunks (--chunk)
        if problem is None:
            try:
                raw, _ = read_job_bytes(path, settings.max_job_bytes)
                pieces = [(job_id, raw)]
                if args.chunk is not None:
                    pieces = [(piece_id, encode(piece, path.suffix)) for piece_id, piece
                              in split_job(job_id, parse_document(raw, path.suffix), args.chunk)]
                for _, piece_raw in pieces:
                    check_job(parse_document(piece_raw, path.suffix), registry=None)
            except InvalidJob as exc:
                problem = exc.message
            except ChunkError as exc:
                problem = f"cannot split into chunks: {exc}"
            except OSError as exc:
                problem = exc.strerror or str(exc)
        currents = {}
        for piece_id, _ in pieces if problem is None else []:  # none dropped if one is busy
            current = currents[piece_id] = _read_sidecar(settings, piece_id)
            if current is not None and not current.state.is_terminal:
                problem = f"job {piece_id} is still {current.state}; not submitted again"
                break
        for piece_id, piece_raw in pieces if problem is None else []:
            problem = _submit(piece_raw, inbox, piece_id, path.suffix.lower())
            if problem is not None:
                break
            current = currents[piece_id]
            submitted[piece_id] = current.created_at.isoformat() if current else None
            out.print(f"submitted {piece_id}", markup=False)
        if problem is not None:
            err.print(f"{path}: {problem}", markup=False)
            status = EXIT_FAILED
    if args.wait and submitted and not _wait_for(settings, submitted):
        status = EXIT_FAILED
    return status


def _chunk_size(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames (1 or more)")
    return int(text)


def _job_name(path: Path) -> tuple[str, str | None]:
    """The job id a file's name gives, and what is wrong with the name, if anything."""
    name = InboxName.of(path.name)
    if name.kind == "ignored":
        return "", "kinod ignores names starting with '.' or ending in .tmp, .part or ~"
    if name.kind != "job":
        return "", "not a job file: its name must end in .yaml, .yml or .json"
    if not is_valid_job_id(name.job_id):
        return name.job_id, f"{name.job_id!r} is not a valid job id ({JOB_ID_RULES})"
    return name.job_id, None


def _submit(raw: bytes, inbox: Path, job_id: str, suffix: str) -> str | None:
    """Drop the job into the inbox; what stopped it, if anything."""
    waiting = f"{job_id} is already in the inbox, not yet picked up"
    try:
        if inbox_has_job(inbox, job_id):
            return waiting
        _drop(raw, inbox / f"{job_id}{suffix}")
    except FileExistsError:
        return waiting
    except OSError as exc:  # permissions, a full disk, a read-only mount
        return f"not submitted: cannot write into the inbox {inbox}: {exc.strerror or exc}"
    return None


def _drop(raw: bytes, dst: Path) -> None:
    """Write under a name the daemon ignores, then rename into place (never replacing a file).
    Others may write the inbox: the temporary name cannot be guessed, and it is made new
    (``new_temporary``), so nothing is written through a link left there."""
    fd, tmp_name = new_temporary(str(dst.parent), dst.name, 0o666)  # the umask decides
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            tmp_file.write(raw)  # a write that fails half-way leaves no temporary behind
        rename_noreplace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _wait_for(settings: Settings, jobs: dict[str, str | None], want: str = "succeeded") -> bool:
    """Follow each job's new run to its end; True when every one ended ``want``."""
    from kinod.cli_views import follow

    return follow(settings, jobs, want, _read_sidecar, WAIT_POLL_S)


def _read_sidecar(settings: Settings, job_id: str) -> Sidecar | None:
    try:
        return Sidecar.from_json((settings.outbox / f"{job_id}.json").read_bytes())
    except (OSError, ValueError):
        return None


# --- status, plugins, validate ----------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from kinod.cli_views import show_job, show_jobs

    settings = _settings(args)
    if args.id is None:
        if args.json and args.watch:
            err.print("--watch with --json needs a job ID", markup=False)
            return EXIT_USAGE
        return show_jobs(settings, args.json, args.watch, _read_sidecar)
    if not is_valid_job_id(args.id):
        err.print(f"{args.id!r} is not a valid job id", markup=False)
        return EXIT_USAGE
    if _read_sidecar(settings, args.id) is None:
        err.print(f"no job {args.id} in {settings.outbox}", markup=False)
        return EXIT_NOT_FOUND
    return show_job(settings, args.id, args.json, args.watch, _read_sidecar)


def cmd_nodes(args: argparse.Namespace) -> int:
    from kinod.cli_views import show_nodes

    settings = _settings(args)
    _inbox(settings)
    return show_nodes(settings, args.json)


def cmd_plugins(args: argparse.Namespace) -> int:
    from kinod.cli_views import show_plugins

    settings = _settings(args, required=False)
    registry = PluginRegistry(settings.plugin_dirs)
    show_plugins(registry, args.json)
    return EXIT_FAILED if registry.errors else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(args, required=False)
    registry = PluginRegistry(settings.plugin_dirs)
    status = EXIT_OK
    for path in args.files:
        try:
            problem = _job_name(path)[1]
            if problem is not None:
                raise InvalidJob(problem)
            raw, _ = read_job_bytes(path, settings.max_job_bytes)
            _, plugin, _ = check_job(parse_document(raw, path.suffix), registry)
        except InvalidJob as exc:
            out.print(f"{path}: invalid: {exc.message}", markup=False)
            status = EXIT_FAILED
        except OSError as exc:
            out.print(f"{path}: cannot read: {exc.strerror or exc}", markup=False)
            status = EXIT_FAILED
        else:
            out.print(f"{path}: ok ({plugin.name})", markup=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
