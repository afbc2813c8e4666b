"""kinod's error family: each error knows the ``error.code`` it puts in a sidecar."""

from __future__ import annotations


class KinodError(Exception):
    code = "error"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class InvalidJob(KinodError):
    """The job file cannot be run as written (syntax, schema, unknown plugin, bad data)."""

    code = "invalid_job"


class PluginFailed(KinodError):
    """The plugin returned ``success=False``."""

    code = "plugin_failed"


class PluginCrashed(KinodError):
    """The plugin raised instead of returning a result."""

    code = "plugin_error"


class JobTimeout(KinodError):
    code = "timeout"


class JobStalled(KinodError):
    code = "stalled"


class JobStopped(KinodError):
    code = "stopped"


class JobLost(KinodError):
    """The job's file left the spool before it could run (someone moved it away)."""

    code = "lost"


class DaemonCrashed(KinodError):
    """The daemon died while running the job too many times in a row."""

    code = "crashed"


class ConfigError(KinodError):
    code = "config"


class DependencyFailed(KinodError):
    """A job named in ``after`` ended failed or stopped: this one never runs."""

    code = "dependency_failed"


class DependencyCycle(KinodError):
    """The job waits, through ``after``, on itself."""

    code = "dependency_cycle"
