"""Settings: ``config.yaml``, then ``KINOD_<KEY>`` environment overrides, checked by one model."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kinod.errors import ConfigError
from kinod.params import format_validation_error

ENV_PREFIX = "KINOD_"
# Environment variables with this prefix that are not settings.
# Read by kinod elsewhere: KINOD_PORTABLE_RENAME by kinod.atomic_files.
ENV_NOT_SETTINGS = {"KINOD_CONFIG", "KINOD_PORTABLE_RENAME"}


class PluginSettings(BaseModel):
    """``plugins.<name>``: limits kinod applies, plus the plugin's own settings."""

    # The plugin's own keys (e.g. comfyui_urls) pass through to plugin.settings.
    model_config = ConfigDict(extra="allow")

    max_concurrency: int | None = Field(default=None, ge=1)
    # process: each job in a child process of its own (kinod.isolation), which a plugin
    # that exits, crashes or ignores cancellation cannot take the daemon down with.
    isolation: Literal["thread", "process"] = "thread"

    def plugin_settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


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
        if key in ("node", "inbox", "outbox", "frames", "models", "plugin_dirs", "serves"):
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
            "plugin_dirs": [resolve(p) for p in settings.plugin_dirs],
        }
    )
