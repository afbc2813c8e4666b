"""Reference pages filled in from the code when the site is built.

A page holds a marker, ``<!-- generated: NAME -->``, and this hook puts in its place the
text ``GENERATORS[NAME]()`` makes from kinod itself: the settings model
(``kinod.config.Settings``), the argument parser (``kinod.cli.build_parser()``), the HTTP
API's OpenAPI schema (``kinod.api.app.create_app``) and the built-in plugins'
``get_plugin_info()``. kinod is only imported and read here, never changed.

The tests import this file too (tests/test_docs_reference.py), so every generator runs in
``make test`` as well as in ``make docs``.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"<!-- generated: ([a-z_-]+) -->")

# What each setting means, in the words of the docs. A setting of the model that is missing
# here still gets a row: its comment in kinod/default_config.yaml (the file `kinod init`
# writes) is used instead, so a new setting shows up the day it is added.
SETTING_NOTES: dict[str, str] = {
    "inbox": "job files and control files (`.stop`, `.hold`, `.release`, `.pause`); the "
             "spool lives in `inbox/.kinod/`",
    "outbox": "sidecars (`<id>.json`) and job logs (`<id>.log`)",
    "frames": "plugin output, one folder per job: `<frames>/<id>/`",
    "models": "model files, e.g. `models_storage/StableDiffusion/*.safetensors`",
    "plugin_dirs": "more plugin folders, each holding `<name>/loader.py`; in the "
                   "environment, a `:`-separated list",
    "workers": "jobs run at once by this daemon. A job's slot is free once its end is "
               "stamped (`finished_at`): the next job starts while its final sidecar is "
               "flushed, so for that millisecond one sidecar more may still say `running`",
    "plugins": "per-plugin settings, `plugins.<name>.*`: see [below](#pluginsname)",
    "node": "this daemon's name in sidecars and in `inbox/.kinod/running/<node>/`; no `/`, "
            "not starting with `.`; `null`: the host name",
    "stop_grace": "seconds a stopping job gets before it is cancelled by force",
    "settle_s": "seconds a file written in place (not renamed in) must be quiet before it "
                "is read",
    "rescan_interval_s": "seconds between full inbox rescans, which catch anything a file "
                         "event missed (e.g. on network file systems)",
    "progress_interval_s": "at most one progress write per job per this many seconds",
    "max_job_bytes": "larger job files (and API request bodies) are refused without being "
                     "read",
    "max_crash_attempts": "a job the daemon died while running this many times fails as "
                          "`crashed` instead of running again",
    "serves": "the plugins this daemon runs, e.g. `[sdxl]`: it never claims a job of "
              "another plugin; `null`: every plugin it loads. In the environment, a "
              "`:`-separated list",
    "lease": "seconds a node's heartbeat may stand still before other nodes take back its "
             "running jobs",
    "watch": "how new files are noticed: `inotify` (file events), `poll` (a look every "
             "`poll_interval_s`), or `auto`: `poll` when the inbox is on a network file "
             "system (NFS, SMB/CIFS, Ceph, GlusterFS, Lustre, FUSE...), else `inotify`",
    "poll_interval_s": "in `poll` mode, seconds between looks at the inbox and the queue",
    "log_format": "the daemon's log on stderr: `text`, or `json` (one JSON object a line)",
    "log_level": "the least level logged (any case)",
    "http": "the HTTP API and dashboard: see [below](#http)",
    "executor": "where jobs' plugins run: `local` (this node's threads or processes, see "
                "`plugins.<name>.isolation`) or `ray` (tasks on a Ray cluster)",
    "ray": "the Ray cluster, with `executor: ray`: see [below](#ray)",
    "hooks": "commands and webhooks told when a job ends: see [below](#hooks) and "
             "[Chain jobs and get told when they end](../how-to/pipelines.md)",
    "keep_ended_days": "prune jobs that ended more than this many days ago; `null`: keep "
                       "everything. The one setting under which kinod deletes job files "
                       "(see [Folder layout](folders.md#retention))",
    "keep_ended_frames": "`false`: pruning a job removes its `data/frames/<id>/` too",
    "workflows": "API-format ComfyUI workflows the `comfyui` plugin runs",
    "projects": "`.blend` files the `blender` plugin renders",
    # nested models
    "http.listen": "`host:port` (`[::1]:8000` for IPv6; port 0 takes a free one, which the "
                   "log names); `null`: `kinod run` serves no API",
    "http.token_file": "a file holding the token every request but `/healthz` must bear "
                       "(`Authorization: Bearer <token>`); relative to `config.yaml`",
    "ray.address": "the cluster, e.g. `ray://head:10001` or `auto`; `null`: a local cluster",
    "ray.outputs": "`shared`: plugins write `data/frames/<id>/` on storage the Ray nodes "
                   "share; `returned`: a job's output files come back with its result and "
                   "the daemon writes them",
    "plugins.max_concurrency": "at most this many jobs of the plugin at once on this "
                               "daemon; a plugin at its limit never holds up other plugins",
    "plugins.isolation": "`thread`, or `process`: each job of the plugin in a child "
                         "process of its own (see [Plugins](plugins.md#isolation))",
    "plugins.ray": "with `executor: ray`, what each job asks of the cluster: `num_cpus`, "
                   "`num_gpus`, `resources` (custom resources)",
    "hooks.on": "the ends that call the hook",
    "hooks.types": "only jobs of these plugins; `null`: every plugin",
    "hooks.run": "a command, as a list of words; no shell reads it, so `$HOME` or `*` reach "
                 "it as written",
    "hooks.url": "an `http://` or `https://` URL the sidecar is POSTed to",
    "hooks.retries": "attempts after a first one that failed",
    "hooks.timeout": "seconds one attempt may take",
    "hooks.backoff": "seconds before the first retry; doubled for each retry after it (at "
                     "most an hour apart)",
}


def expand(markdown: str) -> str:
    """Put each marker's generated text in its place; an unknown marker is an error."""
    def generate(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"no generator named {name!r} (known: {sorted(GENERATORS)})")
        return GENERATORS[name]()
    return MARKER.sub(generate, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:  # the mkdocs hook
    return expand(markdown)


# --- settings -------------------------------------------------------------------------


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (types.UnionType, typing.Union):
        parts = [a for a in args if a is not type(None)]
        text = " \\| ".join(_type_text(a) for a in parts)
        return text + (" or `null`" if len(parts) < len(args) else "")
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {Path: "path", int: "integer", float: "number", str: "text", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    if isinstance(value, list | dict) and not value:
        return "`[]`" if isinstance(value, list) else "`{}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _bounds_text(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None and isinstance(item, annotated_types.BaseMetadata):
                words.append(f"{sign} {value}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            words.append(f"length ≥ {item.min_length}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            words.append(f"matches `{pattern}`")
    return ", ".join(words)


def _config_comments() -> dict[str, str]:
    """Each top-level key's comment in the file `kinod init` writes."""
    from importlib.resources import files

    text = files("kinod").joinpath("default_config.yaml").read_text(encoding="utf-8")
    comments = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+):[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _settings_table(model: type[BaseModel], prefix: str, notes: dict[str, str]) -> str:
    rows = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        note = notes.get(key) or notes.get(name) or ""
        rows.append(f"| `{key}` | {_type_text(field.annotation)} | {_default_text(field)} | "
                    f"{_bounds_text(field)} | {note} |")
    return "\n".join(rows)


def settings_notes() -> dict[str, str]:
    """The meaning of every setting: the docs' own words, else default_config.yaml's."""
    notes = dict(_config_comments())
    notes.update(SETTING_NOTES)
    return notes


def settings_reference() -> str:
    from kinod.config import HookSettings, HttpSettings, PluginSettings, RaySettings, Settings

    notes = settings_notes()
    plugin_notes = {f"plugins.<name>.{k.split('.', 1)[1]}": v for k, v in notes.items()
                    if k.startswith("plugins.")}
    hook_notes = {f"hooks[].{k.split('.', 1)[1]}": v for k, v in notes.items()
                  if k.startswith("hooks.")}
    parts = [
        "## Top-level keys", "",
        _settings_table(Settings, "", notes), "",
        "## `http`", "",
        _settings_table(HttpSettings, "http.", notes), "",
        "## `plugins.<name>`", "",
        _settings_table(PluginSettings, "plugins.<name>.", plugin_notes), "",
        "Any other key under `plugins.<name>` is passed to the plugin as `self.settings` "
        "(for the ComfyUI plugins, see [Plugins and parameters](plugins.md)).", "",
        "## `ray`", "",
        _settings_table(RaySettings, "ray.", notes), "",
        "## `hooks`", "",
        "A list; each entry is one hook:", "",
        _settings_table(HookSettings, "hooks[].", hook_notes), "",
        "A hook has `run` or `url`, not both.",
    ]
    return "\n".join(parts)


# --- command line ---------------------------------------------------------------------


def cli_reference() -> str:
    from kinod.cli import build_parser

    os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal; the page to one width
    parser = build_parser()
    parts = ["## `kinod`", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        help_text = command.format_help()
        # every command repeats the exit statuses: they are on their own page
        help_text = help_text.split("exit status:")[0].rstrip()
        parts += [f"## `kinod {name}`", "", command.description or "", "",
                  "```text", help_text, "```", ""]
    return "\n".join(parts)


# --- HTTP API -------------------------------------------------------------------------


def openapi_schema() -> dict[str, Any]:
    from kinod.api.app import create_app
    from kinod.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(inbox=root / "inbox", outbox=root / "outbox",
                            frames=root / "frames", models=root / "models", node="docs")
        return create_app(settings, token=None).openapi()


def _schema_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_schema_text(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_text(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    return f"{schema.get('type', 'any')}"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def http_reference() -> str:
    schema = openapi_schema()
    parts = [f"Schema version {schema['info']['version']}, OpenAPI {schema['openapi']}.", ""]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts += [f"### `{method.upper()} {path}`", ""]
            summary = op.get("summary")
            if summary:
                parts += [f"**{summary}.**", ""]
            if op.get("description"):
                parts += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                parts += ["| parameter | in | type | required | meaning |",
                          "| --- | --- | --- | --- | --- |"]
                for p in params:
                    parts.append(f"| `{p['name']}` | {p['in']} | "
                                 f"{_schema_text(p.get('schema', {}))} | "
                                 f"{'yes' if p.get('required') else 'no'} | "
                                 f"{_cell(p.get('description'))} |")
                parts.append("")
            body = op.get("requestBody")
            if body:
                for media, content in body.get("content", {}).items():
                    parts += [f"Body ({media}): {_schema_text(content.get('schema', {}))}", ""]
            parts += ["| status | meaning |", "| --- | --- |"]
            for status, response in op.get("responses", {}).items():
                parts.append(f"| {status} | {_cell(response.get('description'))} |")
            parts.append("")
    components = schema.get("components", {}).get("schemas", {})
    if components:
        parts += ["## Schemas", ""]
        for name, comp in components.items():
            parts += [f"### {name}", ""]
            if comp.get("description"):
                parts += [_cell(comp["description"]), ""]
            props = comp.get("properties", {})
            if props:
                required = set(comp.get("required", []))
                parts += ["| field | type | required | meaning |", "| --- | --- | --- | --- |"]
                for prop, spec in props.items():
                    parts.append(f"| `{prop}` | {_schema_text(spec)} | "
                                 f"{'yes' if prop in required else 'no'} | "
                                 f"{_cell(spec.get('description') or spec.get('title'))} |")
                parts.append("")
    return "\n".join(parts)


# --- plugins --------------------------------------------------------------------------


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return str(value)


def plugins_reference() -> str:
    from kinod.plugins.plugin_loader import PluginRegistry

    registry = PluginRegistry(use_entry_points=False)
    parts = []
    for name, cls in sorted(registry.get_all_plugins().items()):
        info = cls.get_plugin_info()
        parts += [f"### `{name}`", "",
                  f"{info.get('description', '')} (version {info.get('version', '?')}).", ""]
        params = info.get("parameters") or {}
        parts += ["| parameter | type | default | allowed | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        for pname, spec in params.items():
            if spec.get("required"):
                default = "required"
            elif "default" in spec:
                default = f"`{_value_text(spec['default'])}`"
            else:
                default = "left out"
            allowed = []
            if "minimum" in spec:
                allowed.append(f"≥ {spec['minimum']}")
            if "maximum" in spec:
                allowed.append(f"≤ {spec['maximum']}")
            if "enum" in spec:
                allowed.append(", ".join(f"`{v}`" for v in spec["enum"]))
            parts.append(f"| `{pname}` | {spec.get('type', 'any')} | {default} | "
                         f"{'; '.join(allowed)} | {_cell(spec.get('description'))} |")
        parts.append("")
    if registry.errors:
        parts += ["Built-in plugins that failed to load where this page was built:", ""]
        parts += [f"- `{name}`: {_cell(error.splitlines()[-1])}"
                  for name, error in registry.errors.items()]
    return "\n".join(parts)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_reference,
    "cli": cli_reference,
    "http-api": http_reference,
    "plugins": plugins_reference,
}
