"""The reference pages made from the code (docs/_hooks/reference.py) build, and cover
what the code has: every setting, every command, every operation, every built-in plugin."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "_hooks" /
                                                  "reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_has_a_row_and_a_meaning(reference: ModuleType) -> None:
    from kinod.config import Settings

    text = reference.settings_reference()
    notes = reference.settings_notes()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in text
        assert notes.get(name), f"setting {name} has no meaning on the settings page"


def test_every_command_has_its_help(reference: ModuleType) -> None:
    from kinod.cli import build_parser

    text = reference.cli_reference()
    commands = re.findall(r"^    (\w+)\s{2,}", build_parser().format_help(), re.MULTILINE)
    assert commands
    for command in commands:
        assert f"## `kinod {command}`" in text


def test_every_operation_of_the_api_is_listed(reference: ModuleType) -> None:
    schema = reference.openapi_schema()
    text = reference.http_reference()
    for path, methods in schema["paths"].items():
        for method in methods:
            assert f"### `{method.upper()} {path}`" in text


def test_every_built_in_plugin_and_parameter_is_listed(reference: ModuleType) -> None:
    from kinod.plugins.plugin_loader import PluginRegistry

    text = reference.plugins_reference()
    for name, cls in PluginRegistry(use_entry_points=False).get_all_plugins().items():
        assert f"### `{name}`" in text
        for parameter in cls.get_plugin_info().get("parameters", {}):
            assert f"| `{parameter}` |" in text


def test_every_marker_on_a_page_has_a_generator(reference: ModuleType) -> None:
    for page in DOCS.rglob("*.md"):
        for name in reference.MARKER.findall(page.read_text()):
            assert name in reference.GENERATORS, f"{page.name}: no generator {name!r}"


def test_the_readme_links_into_pages_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / target).exists(), f"README links to a missing page: {target}"
