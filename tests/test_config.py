"""Settings: config.yaml, KINOD_* overrides, errors that name the key."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import yaml

from kinod.config import PluginSettings, Settings, load_settings
from kinod.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def load(path: Path, **environ: str) -> Settings:
    return load_settings(path, environ=environ)


def config_error(path: Path, **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, **environ)
    return info.value.message


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_every_default(tmp_path: Path, text: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "render-07")
    settings = load(write(tmp_path, text))
    assert settings.inbox == tmp_path / "inbox"
    assert settings.outbox == tmp_path / "outbox"
    assert settings.frames == tmp_path / "data" / "frames"
    assert settings.models == tmp_path / "models_storage"
    assert settings.plugin_dirs == []
    assert settings.workers == 4
    assert settings.plugins == {}
    assert settings.node == "render-07"
    assert settings.stop_grace == 10
    assert settings.max_job_bytes == 1024 * 1024


def test_node_defaults_to_the_host_name(tmp_path: Path) -> None:
    assert load(write(tmp_path, "node: null\n")).node == socket.gethostname()
    assert load(write(tmp_path, "")).node == socket.gethostname()


def test_node_can_be_named(tmp_path: Path) -> None:
    assert load(write(tmp_path, "node: gpu-box-1\n")).node == "gpu-box-1"


@pytest.mark.parametrize("node", ["a/b", ".hidden"])
def test_node_that_cannot_be_a_folder_name_is_refused(tmp_path: Path, node: str) -> None:
    message = config_error(write(tmp_path, yaml.safe_dump({"node": node})))
    assert "node:" in message


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    folder = tmp_path / "farm" / "etc"
    path = write(folder, "inbox: drop\noutbox: ../results\nframes: /abs/frames\n"
                         "plugin_dirs: [more_plugins, /opt/plugins]\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    settings = load(path)
    assert settings.inbox == folder / "drop"
    assert settings.outbox.resolve() == (tmp_path / "farm" / "results").resolve()
    assert settings.frames == Path("/abs/frames")
    assert settings.models == folder / "models_storage"
    assert settings.plugin_dirs == [folder / "more_plugins", Path("/opt/plugins")]


def test_a_relative_config_path_is_resolved_too(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "site", "inbox: drop\n")
    monkeypatch.chdir(tmp_path)
    settings = load(Path("site/config.yaml"))
    assert settings.inbox.is_absolute()
    assert settings.inbox == (tmp_path / "site" / "drop").resolve()


def test_unknown_key_is_an_error_that_names_it(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "workers: 2\nworkerz: 3\ncolour: red\n"))
    assert "workerz: unknown key" in message
    assert "colour: unknown key" in message
    assert str(tmp_path / "config.yaml") in message


@pytest.mark.parametrize(("text", "key"), [
    ("workers: 0\n", "workers"),
    ("workers: many\n", "workers"),
    ("workers: 2.5\n", "workers"),
    ("stop_grace: -1\n", "stop_grace"),
    ("settle_s: soon\n", "settle_s"),
    ("rescan_interval_s: 0\n", "rescan_interval_s"),
    ("max_job_bytes: 0\n", "max_job_bytes"),
    ("log_format: xml\n", "log_format"),
    ("log_level: LOUD\n", "log_level"),
    ("plugin_dirs: 5\n", "plugin_dirs"),
    ("plugins: [sdxl]\n", "plugins"),
    ("plugins: {sdxl: {max_concurrency: 0}}\n", "plugins.sdxl.max_concurrency"),
    ("plugins: {sdxl: {isolation: fork}}\n", "plugins.sdxl.isolation"),
    ("inbox: [a, b]\n", "inbox"),
])
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(write(tmp_path, text))
    assert re.search(rf"(^|[ ;]){re.escape(key)}(\.\d+)?: ", message), message


def test_every_bad_key_is_named_at_once(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "workers: 0\nstop_grace: -1\nbogus: 1\n"))
    assert "workers:" in message
    assert "stop_grace:" in message
    assert "bogus: unknown key" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "workers: [1, 2\n"))
    assert "invalid YAML" in message
    assert str(tmp_path / "config.yaml") in message


@pytest.mark.parametrize("text", ["- workers\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert "top level must be a mapping" in config_error(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in config_error(tmp_path / "nope.yaml")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"node: caf\xe9\n")
    assert "cannot read" in config_error(path)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "workers: 2\nstop_grace: 5\n"), KINOD_WORKERS="8")
    assert settings.workers == 8
    assert settings.stop_grace == 5


def test_environment_values_are_typed(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ""), KINOD_STOP_GRACE="2.5", KINOD_LOG_LEVEL="DEBUG",
                    KINOD_PLUGINS="{sdxl: {max_concurrency: 2, comfyui_urls: [http://a:8188]}}")
    assert settings.stop_grace == 2.5
    assert settings.log_level == "DEBUG"
    assert settings.max_concurrency("sdxl") == 2
    assert settings.plugins["sdxl"].plugin_settings() == {"comfyui_urls": ["http://a:8188"]}


def test_environment_node_and_paths_stay_text(tmp_path: Path) -> None:
    # "1234", "yes" or "null" would be YAML numbers, booleans or nothing.
    settings = load(write(tmp_path, ""), KINOD_NODE="1234", KINOD_INBOX="null")
    assert settings.node == "1234"
    assert settings.inbox == tmp_path / "null"


def test_unknown_environment_setting_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, ""), KINOD_FOO="1")
    assert "KINOD_FOO" in message


def test_kinod_config_is_not_a_setting(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "workers: 3\n"), KINOD_CONFIG="/elsewhere/config.yaml")
    assert settings.workers == 3


def test_other_environment_variables_are_ignored(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ""), HOME="/root", WORKERS="9", kinod_workers="9")
    assert settings.workers == 4


def test_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, ""), KINOD_WORKERS="lots")
    assert "workers:" in message


def test_invalid_yaml_in_the_environment(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, ""), KINOD_PLUGINS="{sdxl: [")
    assert "KINOD_PLUGINS" in message


def test_plugin_dirs_from_the_environment_split_on_colons(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "plugin_dirs: [ignored]\n"),
                    KINOD_PLUGIN_DIRS="/opt/a:relative/b::/opt/c")
    assert settings.plugin_dirs == [Path("/opt/a"), tmp_path / "relative" / "b",
                                    Path("/opt/c")]


def test_empty_plugin_dirs_from_the_environment(tmp_path: Path) -> None:
    assert load(write(tmp_path, "plugin_dirs: [x]\n"), KINOD_PLUGIN_DIRS="").plugin_dirs == []


def test_the_os_environment_is_used_by_default(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("KINOD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KINOD_WORKERS", "6")
    assert load_settings(write(tmp_path, "")).workers == 6


def test_per_plugin_settings(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "plugins:\n  sdxl:\n    max_concurrency: 1\n"
                                    "    isolation: process\n"
                                    "    comfyui_urls: [http://gpu1:8188, http://gpu2:8188]\n"
                                    "  example: {}\n"))
    assert settings.max_concurrency("sdxl") == 1
    assert settings.plugins["sdxl"].isolation == "process"
    assert settings.plugins["example"].isolation == "thread"
    assert settings.max_concurrency("example") is None
    assert settings.max_concurrency("unknown") is None
    assert settings.plugins["sdxl"].plugin_settings() == {
        "comfyui_urls": ["http://gpu1:8188", "http://gpu2:8188"]}
    assert settings.plugins["example"].plugin_settings() == {}


def test_plugin_settings_is_a_copy() -> None:
    entry = PluginSettings.model_validate({"url": "x"})
    entry.plugin_settings()["url"] = "changed"
    assert entry.plugin_settings() == {"url": "x"}


# --- the shipped config.yaml ---------------------------------------------------------------


def test_repository_config_is_the_default_config_but_serves_the_api() -> None:
    # `make run` serves the API on 127.0.0.1:8000; the built-in default is off.
    shipped = (REPO / "config.yaml").read_text()
    default = (REPO / "kinod" / "default_config.yaml").read_text()
    listen = re.compile(r"^  listen: .*$", flags=re.MULTILINE)
    assert listen.sub("", shipped) == listen.sub("", default)
    assert load_settings(REPO / "config.yaml", environ={}).http.listen == "127.0.0.1:8000"
    assert load_settings(None, environ={}).http.listen is None


def test_default_config_mentions_every_setting() -> None:
    text = (REPO / "kinod" / "default_config.yaml").read_text()
    keys = set(re.findall(r"^([a-z_]+):", text, flags=re.MULTILINE))
    assert keys == set(Settings.model_fields)


def test_default_config_holds_the_defaults(tmp_path: Path) -> None:
    text = (REPO / "kinod" / "default_config.yaml").read_text()
    from_file = load(write(tmp_path, text, "shipped.yaml"))
    from_nothing = load(write(tmp_path, "", "empty.yaml"))
    assert from_file == from_nothing


def test_no_config_file_at_all_means_defaults_from_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, environ={"KINOD_WORKERS": "2"})
    assert settings.inbox == tmp_path / "inbox"
    assert settings.frames == tmp_path / "data" / "frames"
    assert settings.workers == 2


def test_no_config_file_still_checks_the_environment(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="workers:"):
        load_settings(None, environ={"KINOD_WORKERS": "0"})


@pytest.mark.parametrize("text", ["outbox: inbox\n", "inbox: shared\noutbox: ./shared/\n"])
def test_inbox_and_outbox_cannot_be_one_folder(tmp_path: Path, text: str) -> None:
    # Every sidecar (<id>.json) would be picked up as a new job file.
    message = config_error(write(tmp_path, text))
    assert "inbox" in message
    assert "outbox" in message


@pytest.mark.parametrize("text", ["inbox: .\n", "inbox: ''\n"])
def test_inbox_cannot_be_the_config_files_own_folder(tmp_path: Path, text: str) -> None:
    # config.yaml would be taken as job "config" and moved into the spool.
    assert "inbox" in config_error(write(tmp_path, text))


@pytest.mark.parametrize(("text", "key"), [
    ("stop_grace: .inf\n", "stop_grace"),
    ("rescan_interval_s: .nan\n", "rescan_interval_s"),
    ('node: "a\\0b"\n', "node"),
])
def test_infinite_and_unprintable_values_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_settings(path, environ={})


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("log_level: debug\n")
    assert load_settings(path, environ={}).log_level == "DEBUG"


def test_command_line_overrides_are_checked_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_settings(path, environ={}, overrides={"log_format": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(path, environ={}, overrides={"log_level": "loud"})
