"""Finds, loads and checks generator plugins.

Sources, in order: kinod's built-in plugins, each folder named in
``plugin_dirs`` (one sub-folder per plugin, holding ``__init__.py`` and
``loader.py``), and the ``kinod.plugins`` entry-point group. The first plugin
of a name wins; a later one of the same name is reported as an error. One
broken plugin never stops the others: its error is kept in ``errors``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from kinod.plugins import base_plugin
from kinod.plugins.base_plugin import BasePlugin

BUILTIN_DIR = Path(__file__).resolve().parent
ENTRY_POINT_GROUP = "kinod.plugins"
# How LoadedPlugin.source names an entry point; any other source is a plugin folder.
ENTRY_POINT_SOURCE = "entry point "

# A plugin written from the seed's README does ``from base_plugin import
# BasePlugin``. That must be this very module, or issubclass() would reject it.
sys.modules.setdefault("base_plugin", base_plugin)
sys.modules.setdefault("plugin_loader", sys.modules[__name__])


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    cls: type[BasePlugin]
    info: dict[str, Any]
    params_model: type[BaseModel] | None  # None: the plugin declares no parameters
    source: str

    @property
    def version(self) -> str:
        return str(self.info.get("version", ""))

    @property
    def description(self) -> str:
        return str(self.info.get("description", ""))

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.info.get("parameters") or {})


class _OnClassOrInstance:
    """A method that works on a registry, and on the class too, as the seed calls it
    (``PluginRegistry.get_all_plugins()``): there it uses the registry of the settings in
    ``./config.yaml``, or of the defaults where there is none."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, registry: PluginRegistry | None, owner: type[PluginRegistry]
                ) -> Callable[..., Any]:
        return functools.partial(self.func, registry if registry is not None
                                 else owner.default())


class PluginRegistry:
    """The plugins this daemon can run, by name, and the ones that failed to load."""

    _default: PluginRegistry | None = None

    def __init__(self, plugin_dirs: list[Path] | tuple[Path, ...] = (),
                 use_entry_points: bool = True) -> None:
        self.plugins: dict[str, LoadedPlugin] = {}
        self.errors: dict[str, str] = {}
        for folder in [BUILTIN_DIR, *plugin_dirs]:
            self._scan_folder(Path(folder))
        if use_entry_points:
            self._scan_entry_points()

    @classmethod
    def default(cls) -> PluginRegistry:
        """The registry of ``./config.yaml``'s ``plugin_dirs`` (the defaults without one),
        made at the first call. ConfigError if that file is invalid."""
        if cls._default is None:
            from kinod.config import load_settings

            config = Path("config.yaml")
            settings = load_settings(config if config.is_file() else None)
            cls._default = cls(settings.plugin_dirs)
        return cls._default

    @_OnClassOrInstance
    def get_all_plugins(self) -> dict[str, type[BasePlugin]]:
        return {name: p.cls for name, p in self.plugins.items()}

    @_OnClassOrInstance
    def get_plugin(self, name: str) -> type[BasePlugin] | None:
        loaded = self.plugins.get(name)
        return loaded.cls if loaded else None

    def get(self, name: str) -> LoadedPlugin | None:
        return self.plugins.get(name)

    # --- discovery -------------------------------------------------------

    def _scan_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            self.errors[str(folder)] = f"plugin folder {folder} does not exist"
            return
        for child in sorted(folder.iterdir()):
            if child.name.startswith((".", "_")) or not (child / "loader.py").is_file():
                continue
            self._load(child.name, str(child), lambda c=child: _import_folder(c))

    def _scan_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._load(ep.name, f"{ENTRY_POINT_SOURCE}{ep.value}", ep.load)

    def _load(self, name: str, source: str, importer) -> None:
        if name in self.plugins:
            self.errors[f"{name} ({source})"] = (
                f"a plugin named {name!r} is already loaded from {self.plugins[name].source}"
            )
            return
        try:
            cls = _find_plugin_class(importer())
            info = cls.get_plugin_info()
            if not isinstance(info, dict):
                raise TypeError("get_plugin_info() must return a dict")
            parameters = info.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise TypeError("get_plugin_info()['parameters'] must be a mapping")
            params_model = None
            if parameters is not None:
                from kinod.params import build_params_model

                params_model = build_params_model(name, parameters)
        except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.errors[name] = _describe(exc)
            return
        self.plugins[name] = LoadedPlugin(name, cls, info, params_model, source)


def load_plugin_class(name: str, source: str) -> type[BasePlugin]:
    """Import just the plugin ``name`` from its ``LoadedPlugin.source``, e.g. in a child
    process that runs one of its jobs; raises whatever the import raises."""
    if source.startswith(ENTRY_POINT_SOURCE):
        # The registry took the first entry point of this name; so does this.
        found = entry_points(group=ENTRY_POINT_GROUP, name=name)
        if not found:
            raise ImportError(f"no entry point {name!r} in group {ENTRY_POINT_GROUP}")
        return _find_plugin_class(next(iter(found)).load())
    return _find_plugin_class(_import_folder(Path(source)))


def _import_folder(folder: Path) -> ModuleType:
    """Import ``folder`` as a package of its own, then its ``loader`` module.

    A unique package name per folder keeps two plugins' ``loader`` modules apart
    and lets ``loader.py`` use relative imports (``from .model import ...``).
    """
    package = f"kinod_plugin_{abs(hash(str(folder.resolve()))):x}_{folder.name}"
    for stale in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[stale]  # a reload picks up edited files
    init = folder / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        package, init if init.is_file() else None, submodule_search_locations=[str(folder)]
    )
    if spec is None:
        raise ImportError(f"cannot import {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.loader")


def _find_plugin_class(obj: Any) -> type[BasePlugin]:
    if inspect.isclass(obj):
        candidates = [obj]
        where = obj.__qualname__
    else:
        candidates = [
            value for value in vars(obj).values()
            if inspect.isclass(value) and value.__module__ == obj.__name__
        ]
        where = getattr(obj, "__file__", None) or obj.__name__
    plugins = [c for c in candidates if issubclass(c, BasePlugin) and c is not BasePlugin]
    if len(plugins) > 1:
        named = [c for c in plugins if c.__name__.endswith("Plugin")]
        plugins = named if len(named) == 1 else plugins
    if len(plugins) != 1:
        found = ", ".join(c.__name__ for c in plugins) or "none"
        raise TypeError(f"{where}: expected exactly one BasePlugin subclass, found {found}")
    return plugins[0]


def _describe(exc: BaseException) -> str:
    """The exception and the last frame of the plugin's own code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    where = f" ({own[-1].filename}:{own[-1].lineno})" if own else ""
    return f"{type(exc).__name__}: {exc}{where}"
