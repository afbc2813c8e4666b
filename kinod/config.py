"""Settings: ``config.yaml``, then ``KINOD_<KEY>`` environment overrides, checked by one model."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kinod.errors import ConfigError
from kinod.params import format_validation_error

ENV_PREFIX = "KINOD_"
# Environment variables with this prefix that are not settings.
# Read by kinod elsewhere: KINOD_PORTABLE_RENAME by kinod.atomic_files.
ENV_NOT_SETTINGS = {"KINOD_CONFIG", "KINOD_PORTABLE_RENAME"}


class RayResources(BaseModel):
    """``plugins.<name>.ray``: what each of the plugin's jobs asks of a Ray cluster."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom resources


class RaySettings(BaseModel):
    """``ray``: the cluster jobs run on with ``executor: ray``."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # e.g. ray://head:10001 or auto; None: a local cluster
    # shared: plugins write data/frames/<id>/ on storage the Ray nodes share with this one;
    # returned: a job's output files come back with its result and the daemon writes them.
    outputs: Literal["shared", "returned"] = "shared"


class PluginSettings(BaseModel):
    """``plugins.<name>``: limits kinod applies, plus the plugin's own settings."""

    # The plugin's own keys (e.g. comfyui_urls) pass through to plugin.settings.
    model_config = ConfigDict(extra="allow")

    max_concurrency: int | None = Field(default=None, ge=1)
    # process: each job in a child process of its own (kinod.isolation), which a plugin
    # that exits, crashes or ignores cancellation cannot take the daemon down with.
    isolation: Literal["thread", "process"] = "thread"
    ray: RayResources = Field(default_factory=RayResources)  # with executor: ray

    def plugin_settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class HttpSettings(BaseModel):
    """``http``: the HTTP API and dashboard (SPEC §11)."""

    model_config = ConfigDict(extra="forbid")

    listen: str | None = None       # "host:port"; None: no API in ``kinod run``
    token_file: Path | None = None  # a file holding the bearer token every request needs


TERMINAL_STATES = ("succeeded", "failed", "stopped")


class HookSettings(BaseModel):
    """One entry of ``hooks`` (SPEC §10): a command or a webhook told when a job ends."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    on: list[Literal["succeeded", "failed", "stopped"]] = Field(
        default_factory=lambda: list(TERMINAL_STATES), min_length=1)
    types: list[str] | None = None  # plugins; None: every plugin
    run: list[str] | None = Field(default=None, min_length=1)  # argv, run without a shell
    url: str | None = Field(default=None, pattern=r"^https?://")
    retries: int = Field(default=5, ge=0, le=100)
    timeout: float = Field(default=30.0, gt=0)
    backoff: float = Field(default=10.0, gt=0)  # seconds before the first retry; doubled after

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_key(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true.
        if isinstance(value, dict) and True in value:
            value = {("on" if key is True else key): item for key, item in value.items()}
        return value

    @model_validator(mode="after")
    def _one_target(self) -> HookSettings:
        if (self.run is None) == (self.url is None):
            raise ValueError("a hook needs exactly one of `run` (a command) or `url`")
        return self


class Settings(BaseModel):
    # No infinities or NaN: a stop_grace of .inf would never let a shutdown end.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")
    frames: Path = Path("data/frames")
    models: Path = Path("models_storage")
    plugin_dirs: list[Path] = Field(default_factory=list)
    workers: int = Field(default=4, ge=1, le=1024)
    plugins: dict[str, PluginSettings] = Field(default_factory=dict)
    node: str | None = Field(default=None, min_length=1, validate_default=True)
    stop_grace: float = Field(default=10.0, ge=0)
    settle_s: float = Field(default=1.0, ge=0)
    rescan_interval_s: float = Field(default=30.0, gt=0)
    progress_interval_s: float = Field(default=0.5, ge=0)
    max_job_bytes: int = Field(default=1024 * 1024, ge=1)
    max_crash_attempts: int = Field(default=3, ge=1)
    serves: list[str] | None = None  # None: every plugin this node loads
    lease: float = Field(default=60.0, gt=0)
    watch: Literal["auto", "inotify", "poll"] = "auto"
    poll_interval_s: float = Field(default=2.0, gt=0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    http: HttpSettings = Field(default_factory=HttpSettings)
    # Where jobs' plugins run: on this node (threads or processes, see plugins.<name>.isolation)
    # or as tasks on a Ray cluster.
    executor: Literal["local", "ray"] = "local"
    ray: RaySettings = Field(default_factory=RaySettings)
    hooks: list[HookSettings] = Field(default_factory=list)
    keep_ended_days: float | None = Field(default=None, gt=0)  # None: ended jobs are kept
    keep_ended_frames: bool = True  # False: retention removes a pruned job's frames too
    workflows: Path = Path("workflows")  # API-format ComfyUI workflows (the comfyui plugin)
    projects: Path = Path("projects")    # .blend files (the blender plugin)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("plugin_dirs", "serves", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # KINOD_PLUGIN_DIRS=/a:/b, like PATH; KINOD_SERVES=sdxl:example alike.
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part]
        return value

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str | None) -> str:
        # The node's name becomes a folder name in the spool.
        value = value or socket.gethostname()
        if "/" in value or value.startswith(".") or not value.isprintable():
            raise ValueError("a node name cannot hold '/' or unprintable characters, "
                             "nor start with '.'")
        return value

    def max_concurrency(self, plugin: str) -> int | None:
        entry = self.plugins.get(plugin)
        return entry.max_concurrency if entry else None


def load_settings(path: Path | str | None, environ: dict[str, str] | None = None,
                  overrides: dict[str, Any] | None = None) -> Settings:
    """Read ``path``, apply ``KINOD_*`` variables, then ``overrides`` (command-line options),
    and make paths absolute.

    With ``path`` None every setting has its default, relative to the current folder.
    Raises ConfigError naming every bad or unknown key.
    """
    environ = os.environ if environ is None else environ
    raw = _read_yaml(Path(path)) if path is not None else {}
    raw.update(_env_overrides(environ))
    raw.update(overrides or {})
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        lines = format_validation_error(exc)
        raise ConfigError(f"{path or 'settings'}: " + "; ".join(lines)) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    settings = _absolute(settings, base)
    _check_folders(settings, base, path)
    return settings


def _check_folders(settings: Settings, base: Path, path: Path | str | None) -> None:
    """The inbox must be a folder of its own: anything else kinod writes there (or the
    settings file) would be taken for a job."""
    inbox = settings.inbox.resolve()
    for key in ("outbox", "frames"):
        if getattr(settings, key).resolve() == inbox:
            raise ConfigError(f"{path or 'settings'}: inbox and {key} must be different folders")
    if path is not None and inbox == base.resolve():
        raise ConfigError(f"{path}: inbox cannot be the folder that holds the settings file")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (create one with `kinod init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=yaml.CSafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in Settings.model_fields:
            raise ConfigError(f"environment: {name} is not a setting")
        if key in ("node", "inbox", "outbox", "frames", "models", "plugin_dirs", "serves",
                   "workflows", "projects"):
            overrides[key] = value  # text as given, never YAML-typed
            continue
        try:
            overrides[key] = yaml.load(value, Loader=yaml.CSafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment: {name}: invalid value: {exc}") from None
    return overrides


def _absolute(settings: Settings, base: Path) -> Settings:
    def resolve(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    return settings.model_copy(
        update={
            "inbox": resolve(settings.inbox),
            "outbox": resolve(settings.outbox),
            "frames": resolve(settings.frames),
            "models": resolve(settings.models),
            "workflows": resolve(settings.workflows),
            "projects": resolve(settings.projects),
            "plugin_dirs": [resolve(p) for p in settings.plugin_dirs],
            "http": settings.http.model_copy(update={
                "token_file": settings.http.token_file and resolve(settings.http.token_file)}),
        }
    )
