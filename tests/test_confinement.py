"""Confinement: what a plugin writes stays in its job's folder, and YAML never builds objects."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from kinod.errors import InvalidJob
from kinod.job_document import parse_document
from kinod.plugins.base_plugin import BasePlugin
from kinod.runner import new_plugin

KINOD_SOURCES = sorted((Path(__file__).parent.parent / "kinod").rglob("*.py"))


@pytest.fixture
def plugin(tmp_path: Path) -> BasePlugin:
    plugin = BasePlugin()
    plugin.output_dir = tmp_path / "frames" / "job1"
    return plugin


def test_the_jobs_folder_is_made_when_the_plugin_first_asks_for_it(tmp_path: Path) -> None:
    folder = tmp_path / "frames" / "job1"
    plugin = new_plugin(BasePlugin, folder, {}, tmp_path / "models")
    assert not folder.exists()  # a plugin that writes nothing leaves no empty folder
    assert plugin.output_dir == folder
    assert folder.is_dir()
    folder.rmdir()
    assert plugin.output_dir == folder  # made once, not looked for on every use
    assert not folder.exists()


@pytest.mark.parametrize("parts", [("frame.png",), ("sub", "frame.png"), ("a/b/c.exr",),
                                   ("sub/../frame.png",), (".",)])
def test_output_path_inside_the_jobs_folder(plugin: BasePlugin, parts: tuple[str, ...]) -> None:
    path = plugin.output_path(*parts)
    root = plugin.output_dir.resolve()
    assert path == root or root in path.parents


@pytest.mark.parametrize("parts", [("../../etc/x",), ("..",), ("/etc/x",), ("sub", "/etc/x"),
                                   ("a/../../x",), ("sub", "..", "..", "job2", "x.png")])
def test_output_path_refuses_what_would_leave_the_jobs_folder(
        plugin: BasePlugin, parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="leaves the job's folder"):
        plugin.output_path(*parts)


def test_output_path_refuses_a_link_that_points_out(plugin: BasePlugin, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, plugin.output_dir / "escape")
    with pytest.raises(ValueError, match="leaves the job's folder"):
        plugin.output_path("escape", "x.png")
    assert list(outside.iterdir()) == []


def test_output_path_needs_the_folder_kinod_sets() -> None:
    with pytest.raises(RuntimeError, match="output_dir"):
        BasePlugin().output_path("x.png")


def test_yaml_tags_that_build_python_objects_are_refused() -> None:
    for text in ("a: !!python/object/apply:os.system ['true']\n",
                 "a: !!python/name:os.system\n"):
        with pytest.raises(InvalidJob):
            parse_document(text.encode(), ".yaml")


def test_every_yaml_load_in_kinod_uses_a_safe_c_loader() -> None:
    """A reviewer's check, kept as a test: no yaml.load without CSafeLoader (or a subclass
    of it), and none of the loaders that can build objects."""
    loads = []
    for source in KINOD_SOURCES:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "yaml"):
                continue
            assert node.func.attr not in ("unsafe_load", "full_load", "load_all"), source
            if node.func.attr in ("load", "parse", "compose"):
                loader = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("Loader")
                loads.append((source.name, loader))
    assert loads, "no yaml.load found: has the check gone stale?"
    for name, loader in loads:
        assert loader in ("yaml.CSafeLoader", "_StrictSafeLoader"), (name, loader)
    strict = Path(__file__).parent.parent / "kinod" / "job_document.py"
    assert "class _StrictSafeLoader(yaml.CSafeLoader)" in strict.read_text()
