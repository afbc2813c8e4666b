"""The plugin registry: built-ins, plugin folders, entry points; one broken plugin stops none."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kinod.params import check_data
from kinod.plugins import plugin_loader
from kinod.plugins.base_plugin import BasePlugin, PluginResult
from kinod.plugins.plugin_loader import BUILTIN_DIR, PluginRegistry

# The loader.py of the seed's plugin README ("Step 3"), as a plugin author would copy it.
# One change: the README's `data={'output_path': '...', ...}` is not valid Python (the
# trailing `...` has no key), so it reads `'...': '...'` here.
SEED_README_LOADER = '''\
# plugins/my_plugin/loader.py
import sys
import os
from typing import Dict, Any, Optional, Callable

# Add parent directory to path for imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from base_plugin import BasePlugin, PluginResult


class MyPlugin(BasePlugin):
    """Your plugin description"""

    async def generate(
        self,
        task_id: int,
        data: Dict[str, Any],
        progress_callback: Optional[Callable[[float], None]] = None
    ) -> PluginResult:
        """Main generation logic"""
        try:
            self.is_running = True
            self.should_stop = False
            self.progress = 0.0

            # Your code here
            # ...

            self.update_progress(50.0, progress_callback)

            # Check for stop
            if self.should_stop:
                return PluginResult(
                    success=False,
                    data={},
                    error="Stopped by user"
                )

            # Return result
            self.is_running = False
            return PluginResult(
                success=True,
                data={'output_path': '...', '...': '...'}
            )

        except Exception as e:
            self.is_running = False
            return PluginResult(
                success=False,
                data={},
                error=str(e)
            )

    async def stop(self):
        """Stop generation"""
        self.should_stop = True
        self.is_running = False

    @classmethod
    def get_plugin_info(cls) -> Dict[str, Any]:
        """Plugin metadata"""
        return {
            'name': 'my_plugin',
            'version': '1.0.0',
            'description': 'My custom generator',
            'author': 'Your Name',
            'parameters': {
                'param1': {
                    'type': 'string',
                    'required': True,
                    'description': 'First parameter'
                }
            }
        }
'''

SEED_README_INIT = '''\
# plugins/my_plugin/__init__.py
"""
My plugin package
"""
'''


def plain_plugin(class_name: str = "GoodPlugin", version: str = "1.0",
                 parameters: str = "{}") -> str:
    return textwrap.dedent(f"""\
        from kinod.plugins.base_plugin import BasePlugin, PluginResult


        class {class_name}(BasePlugin):
            async def generate(self, task_id, data, progress_callback=None):
                return PluginResult(success=True)

            @classmethod
            def get_plugin_info(cls):
                return {{"name": "x", "version": {version!r}, "parameters": {parameters}}}
        """)


INFO_NOT_A_DICT = textwrap.dedent("""\
    from kinod.plugins.base_plugin import BasePlugin


    class ListInfoPlugin(BasePlugin):
        @classmethod
        def get_plugin_info(cls):
            return ["name", "version"]
    """)


def make_plugin(folder: Path, name: str, loader: str, init: str = "",
                **extra_files: str) -> Path:
    plugin = folder / name
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(init)
    (plugin / "loader.py").write_text(loader)
    for file_name, text in extra_files.items():
        (plugin / f"{file_name}.py").write_text(text)
    return plugin


@pytest.fixture(autouse=True)
def isolated_imports() -> Iterator[None]:
    """Seed plugins add to sys.path and every plugin to sys.modules: undo both."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith("kinod_plugin_"):  # the packages the registry made for plugins
            del sys.modules[name]


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    return folder


def registry_of(*folders: Path) -> PluginRegistry:
    return PluginRegistry(list(folders), use_entry_points=False)


# --- built-ins -----------------------------------------------------------------------------


def test_builtin_example_loads() -> None:
    registry = registry_of()
    example = registry.get("example")
    assert example is not None, registry.errors
    assert issubclass(example.cls, BasePlugin)
    assert example.version == "1.0.0"
    assert example.description
    assert set(example.parameters) == {"prompt", "steps"}
    assert example.source == str(BUILTIN_DIR / "example")
    assert check_data(example.params_model, {"prompt": "p"}) == {"prompt": "p", "steps": 10}
    assert not [key for key in registry.errors if key.startswith("example")]


def test_registry_accessors() -> None:
    registry = registry_of()
    assert registry.get_plugin("example") is registry.get("example").cls
    assert registry.get_all_plugins()["example"] is registry.get("example").cls
    assert registry.get_plugin("nope") is None
    assert registry.get("nope") is None


@pytest.fixture
def fresh_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The class-level registry is made again from the current folder's config.yaml."""
    monkeypatch.setattr(PluginRegistry, "_default", None)
    yield


def test_seed_calls_on_the_class_use_config_yaml(tmp_path: Path, plugins_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 fresh_default: None) -> None:
    make_plugin(plugins_dir, "my_plugin", SEED_README_LOADER, SEED_README_INIT)
    (tmp_path / "config.yaml").write_text(f"plugin_dirs: [{plugins_dir}]\n")
    monkeypatch.chdir(tmp_path)
    plugins = PluginRegistry.get_all_plugins()
    assert {"example", "my_plugin"} <= plugins.keys()
    assert PluginRegistry.get_plugin("my_plugin") is plugins["my_plugin"]
    assert PluginRegistry.get_plugin("nope") is None
    # ... and on an instance, its own plugins, as before
    assert "my_plugin" not in PluginRegistry().get_all_plugins()


def test_seed_calls_on_the_class_without_config_yaml_use_the_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_default: None) -> None:
    monkeypatch.chdir(tmp_path)
    assert PluginRegistry.get_plugin("example").__name__ == "ExamplePlugin"
    assert set(PluginRegistry.get_all_plugins()) == {"blender", "comfyui", "example", "sdxl"}


def test_the_seeds_troubleshooting_line_prints_the_plugins(tmp_path: Path) -> None:
    line = ("from kinod.plugins.plugin_loader import PluginRegistry; "
            "print(PluginRegistry.get_all_plugins())")
    done = subprocess.run([sys.executable, "-c", line], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "'example':" in done.stdout and "ExamplePlugin" in done.stdout


def test_base_plugin_module_is_shared_with_seed_style_imports() -> None:
    registry_of()
    import base_plugin  # what a seed plugin imports after its sys.path.insert

    assert base_plugin.BasePlugin is BasePlugin
    assert base_plugin.PluginResult is PluginResult


# --- plugin folders ------------------------------------------------------------------------


def test_plugin_written_as_the_seed_readme_shows_loads(plugins_dir: Path) -> None:
    make_plugin(plugins_dir, "my_plugin", SEED_README_LOADER, init=SEED_README_INIT)
    registry = registry_of(plugins_dir)
    assert registry.errors == {}
    loaded = registry.get("my_plugin")
    assert loaded is not None
    assert issubclass(loaded.cls, BasePlugin)
    assert loaded.cls.__name__ == "MyPlugin"
    assert loaded.source == str(plugins_dir / "my_plugin")
    assert loaded.version == "1.0.0"
    assert check_data(loaded.params_model, {"param1": "v"}) == {"param1": "v"}


def test_seed_readme_plugin_runs_and_returns_kinods_plugin_result(plugins_dir: Path) -> None:
    make_plugin(plugins_dir, "my_plugin", SEED_README_LOADER, init=SEED_README_INIT)
    plugin = registry_of(plugins_dir).get_plugin("my_plugin")()
    progress: list[float] = []
    result = asyncio.run(plugin.generate("job1", {"param1": "v"}, progress.append))
    # outcome.judge relies on isinstance(result, PluginResult) with kinod's own class.
    assert isinstance(result, PluginResult)
    assert result.success is True
    assert progress == [50.0]


def test_plugin_name_is_its_folders_name(plugins_dir: Path) -> None:
    make_plugin(plugins_dir, "renamed", SEED_README_LOADER)  # info says 'my_plugin'
    registry = registry_of(plugins_dir)
    assert registry.get("renamed") is not None
    assert registry.get("my_plugin") is None


@pytest.mark.parametrize(("loader", "expected"), [
    ("def broken(:\n    pass\n", "SyntaxError"),
    ("raise RuntimeError('no GPU on this node')\n", "RuntimeError: no GPU on this node"),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("import kinod_no_such_module_anywhere\n", "ModuleNotFoundError"),
    ("class NotAPlugin:\n    pass\n", "found none"),
    (plain_plugin(parameters="{'size': {'type': 'complex'}}"), "parameter 'size'"),
    (plain_plugin(parameters="{'prompt': {'type': 'string', 'minimum': 1}}"),
     "parameter 'prompt'"),
    (plain_plugin(parameters="['prompt']"), "must be a mapping"),
    (INFO_NOT_A_DICT, "must return a dict"),
    (INFO_NOT_A_DICT.replace('return ["name", "version"]', 'raise KeyError("gpu")'),
     "KeyError: 'gpu'"),
])
def test_broken_plugin_is_reported_and_others_still_load(plugins_dir: Path, loader: str,
                                                         expected: str) -> None:
    make_plugin(plugins_dir, "aaa_good", plain_plugin())
    make_plugin(plugins_dir, "broken", loader)
    make_plugin(plugins_dir, "zzz_good", plain_plugin())
    registry = registry_of(plugins_dir)
    assert "broken" not in registry.plugins
    assert expected in registry.errors["broken"], registry.errors["broken"]
    assert {"example", "aaa_good", "zzz_good"} <= set(registry.plugins)


def test_import_error_names_the_plugins_file_and_line(plugins_dir: Path) -> None:
    make_plugin(plugins_dir, "broken", "x = 1\n\nraise ValueError('bad config')\n")
    message = registry_of(plugins_dir).errors["broken"]
    assert message.startswith("ValueError: bad config")
    assert f"{plugins_dir / 'broken' / 'loader.py'}:3" in message


def test_error_raised_in_a_helper_module_names_the_helper(plugins_dir: Path) -> None:
    make_plugin(plugins_dir, "broken", "from .helper import VALUE\n",
                helper="VALUE = 1 / 0\n")
    message = registry_of(plugins_dir).errors["broken"]
    assert "ZeroDivisionError" in message
    assert "helper.py:1" in message


def test_two_plugin_classes_are_ambiguous(plugins_dir: Path) -> None:
    loader = plain_plugin("First") + "\n\n" + textwrap.dedent("""\
        class Second(BasePlugin):
            pass
        """)
    make_plugin(plugins_dir, "twins", loader)
    message = registry_of(plugins_dir).errors["twins"]
    assert "found First, Second" in message


def test_a_helper_base_class_is_fine_when_one_class_is_named_plugin(plugins_dir: Path) -> None:
    loader = textwrap.dedent("""\
        from kinod.plugins.base_plugin import BasePlugin, PluginResult


        class CommonBase(BasePlugin):
            pass


        class RealPlugin(CommonBase):
            async def generate(self, task_id, data, progress_callback=None):
                return PluginResult(success=True)
        """)
    make_plugin(plugins_dir, "layered", loader)
    registry = registry_of(plugins_dir)
    assert registry.get_plugin("layered").__name__ == "RealPlugin"


def test_a_plugin_may_extend_another_plugins_class(plugins_dir: Path) -> None:
    # The imported ExamplePlugin is not this plugin's own class: only OwnPlugin counts.
    loader = textwrap.dedent("""\
        from kinod.plugins.example.loader import ExamplePlugin


        class OwnPlugin(ExamplePlugin):
            STEP_SECONDS = 0
        """)
    make_plugin(plugins_dir, "own", loader)
    registry = registry_of(plugins_dir)
    assert registry.errors == {}
    assert registry.get_plugin("own").__name__ == "OwnPlugin"
    assert set(registry.get("own").parameters) == {"prompt", "steps"}


def test_relative_imports_inside_a_plugin_folder(plugins_dir: Path) -> None:
    loader = textwrap.dedent("""\
        from kinod.plugins.base_plugin import BasePlugin

        from .model import MODEL_NAME
        from .utils.paths import OUTPUT


        class RelPlugin(BasePlugin):
            model = MODEL_NAME
            output = OUTPUT
        """)
    plugin = make_plugin(plugins_dir, "rel", loader, model="MODEL_NAME = 'tiny'\n")
    (plugin / "utils").mkdir()
    (plugin / "utils" / "__init__.py").write_text("")
    (plugin / "utils" / "paths.py").write_text("OUTPUT = 'frames'\n")
    registry = registry_of(plugins_dir)
    assert registry.errors == {}
    cls = registry.get_plugin("rel")
    assert (cls.model, cls.output) == ("tiny", "frames")


def test_plugins_with_same_named_helpers_stay_apart(plugins_dir: Path) -> None:
    for name, value in (("alpha", "A"), ("beta", "B")):
        loader = textwrap.dedent(f"""\
            from kinod.plugins.base_plugin import BasePlugin

            from .helper import VALUE


            class {name.title()}Plugin(BasePlugin):
                value = VALUE
            """)
        make_plugin(plugins_dir, name, loader, helper=f"VALUE = {value!r}\n")
    registry = registry_of(plugins_dir)
    assert registry.get_plugin("alpha").value == "A"
    assert registry.get_plugin("beta").value == "B"


def test_same_folder_name_in_two_plugin_dirs(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_plugin(first, "dup", plain_plugin(version="1"))
    make_plugin(second, "dup", plain_plugin(version="2"))
    registry = registry_of(first, second)
    assert registry.get("dup").version == "1"  # the first one wins
    key = f"dup ({second / 'dup'})"
    assert key in registry.errors
    assert "already loaded from" in registry.errors[key]
    assert str(first / "dup") in registry.errors[key]


def test_a_plugin_named_like_a_builtin_is_a_duplicate(plugins_dir: Path) -> None:
    make_plugin(plugins_dir, "example", plain_plugin())
    registry = registry_of(plugins_dir)
    assert registry.get("example").source == str(BUILTIN_DIR / "example")
    assert f"example ({plugins_dir / 'example'})" in registry.errors


def test_folders_that_are_not_plugins_are_skipped(plugins_dir: Path) -> None:
    (plugins_dir / "no_loader").mkdir()
    (plugins_dir / "no_loader" / "__init__.py").write_text("raise RuntimeError('never run')\n")
    make_plugin(plugins_dir, "_private", "raise RuntimeError('never run')\n")
    make_plugin(plugins_dir, ".hidden", "raise RuntimeError('never run')\n")
    (plugins_dir / "__pycache__").mkdir()
    (plugins_dir / "loose_file.py").write_text("raise RuntimeError('never run')\n")
    make_plugin(plugins_dir, "good", plain_plugin())
    registry = registry_of(plugins_dir)
    assert registry.errors == {}
    assert set(registry.plugins) == {"blender", "comfyui", "example", "sdxl", "good"}


def test_missing_plugin_folder_is_reported(tmp_path: Path) -> None:
    registry = registry_of(tmp_path / "nowhere")
    assert "does not exist" in registry.errors[str(tmp_path / "nowhere")]
    assert "example" in registry.plugins


def test_an_edited_plugin_is_reloaded_by_a_new_registry(plugins_dir: Path) -> None:
    plugin = make_plugin(plugins_dir, "changing", plain_plugin(version="1"))
    assert registry_of(plugins_dir).get("changing").version == "1"
    (plugin / "loader.py").write_text(plain_plugin(version="2.0.0-edited"))
    assert registry_of(plugins_dir).get("changing").version == "2.0.0-edited"


def test_plugin_without_declared_parameters_has_no_model(plugins_dir: Path) -> None:
    loader = textwrap.dedent("""\
        from kinod.plugins.base_plugin import BasePlugin


        class BarePlugin(BasePlugin):
            @classmethod
            def get_plugin_info(cls):
                return {"name": "bare", "version": "0.1"}
        """)
    make_plugin(plugins_dir, "bare", loader)
    loaded = registry_of(plugins_dir).get("bare")
    assert loaded.params_model is None
    assert loaded.parameters == {}


# --- entry points --------------------------------------------------------------------------


class EntryPointPlugin(BasePlugin):
    @classmethod
    def get_plugin_info(cls) -> dict[str, Any]:
        return {"name": "ep", "version": "3.1", "parameters": {"n": {"type": "integer"}}}


class FakeEntryPoint:
    def __init__(self, name: str, value: str, target: Any) -> None:
        self.name, self.value, self._target = name, value, target

    def load(self) -> Any:
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def test_entry_points_load_and_a_broken_one_is_reported(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    points = [FakeEntryPoint("ep_plugin", "pkg.mod:EntryPointPlugin", EntryPointPlugin),
              FakeEntryPoint("ep_broken", "missing.mod:Thing", ImportError("no module 'missing'")),
              FakeEntryPoint("example", "other:Example", EntryPointPlugin)]
    groups: list[str] = []

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return points

    monkeypatch.setattr(plugin_loader, "entry_points", fake_entry_points)
    registry = PluginRegistry()
    assert groups == ["kinod.plugins"]
    loaded = registry.get("ep_plugin")
    assert loaded.cls is EntryPointPlugin
    assert loaded.source == "entry point pkg.mod:EntryPointPlugin"
    assert loaded.version == "3.1"
    assert "ImportError: no module 'missing'" in registry.errors["ep_broken"]
    assert "example (entry point other:Example)" in registry.errors
    assert registry.get("example").source == str(BUILTIN_DIR / "example")


def test_entry_points_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_call(group: str) -> list[Any]:
        raise AssertionError("entry points were scanned")

    monkeypatch.setattr(plugin_loader, "entry_points", no_call)
    assert "example" in PluginRegistry(use_entry_points=False).plugins
