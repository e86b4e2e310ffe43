"""Settings: TOML file, environment and command line through one parser per key."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from app.settings import DEFAULT_PORT, ModelSettings, Settings, SettingValueError, parse_bytes, parse_duration
from app.settings_file import effective_toml, load_settings, save_setting


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    loaded = load_settings(tmp_path / "none.toml", environ={})
    assert loaded.settings == Settings()
    assert loaded.problems == ()


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", """
port = 12000
headroom = "2GiB"
keep_alive = "10m"
monitor_interval_s = 0.1
auto_yield = false
model_dirs = ["/models"]
[models."smollm2"]
priority = 5
min = "256MiB"
max = "1GiB"
engine = "llamacpp"
""")
    loaded = load_settings(path, environ={})
    s = loaded.settings
    assert (s.port, s.headroom_bytes, s.keep_alive_s, s.monitor_interval_s) == (12000, 2 << 30, 600.0, 0.1)
    assert s.auto_yield is False and s.model_dirs == ("/models",)
    assert s.models["smollm2"] == ModelSettings(priority=5, min_bytes=256 << 20, max_bytes=1 << 30, engine="llamacpp")
    assert s.model("other") == ModelSettings()
    assert loaded.sources["port"] == "file" and loaded.problems == ()


def test_bad_value_names_the_key_and_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "s.toml", 'port = "eleven"\nheadroom_bytes = 5\n[models.m]\nengine = "vllm"\npriority = 2\n')
    with caplog.at_level(logging.WARNING):
        loaded = load_settings(path, environ={})
    assert loaded.settings.port == DEFAULT_PORT          # fell back
    assert loaded.settings.headroom_bytes == 5           # the good key kept its value
    assert loaded.settings.models["m"] == ModelSettings(priority=2)
    keys = {p.key for p in loaded.problems}
    assert keys == {"port", "models.m.engine"}
    assert "port" in caplog.text and "models.m.engine" in caplog.text and str(path) in caplog.text


def test_corrupted_file_is_ignored_whole(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", "port = = 3\n\x00garbage[[")
    loaded = load_settings(path, environ={})
    assert loaded.settings == Settings()
    assert [p.key for p in loaded.problems] == ["(whole file)"]


def test_unknown_key_is_reported(tmp_path: Path) -> None:
    loaded = load_settings(write(tmp_path / "s.toml", "prot = 1\n"), environ={})
    assert loaded.problems[0].key == "prot" and "unknown" in loaded.problems[0].message


def test_environment_overrides_file_and_cli_overrides_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", "port = 12000\nheadroom = \"1GiB\"\n")
    environ = {"EBBTIDE_PORT": "13000", "EBBTIDE_HEADROOM": "bogus", "EBBTIDE_MODELS": "/a,/b"}
    loaded = load_settings(path, environ=environ, overrides={"port": 14000})
    assert loaded.settings.port == 14000 and loaded.sources["port"] == "command line"
    assert loaded.settings.headroom_bytes == 1 << 30  # bad env value: the file's value stays
    assert loaded.settings.model_dirs == ("/a", "/b")
    assert [p.source for p in loaded.problems] == ["EBBTIDE_HEADROOM"]


def test_save_setting_keeps_other_values(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", "port = 12000\n[models.m]\npriority = 3\n")
    save_setting(path, "auto_yield", False)
    s = load_settings(path, environ={}).settings
    assert (s.port, s.auto_yield, s.models["m"].priority) == (12000, False, 3)
    with pytest.raises(SettingValueError):
        save_setting(path, "port", "not a port")


def test_effective_toml_round_trips(tmp_path: Path) -> None:
    settings = Settings(port=12345, models={"m": ModelSettings(priority=1)})
    path = write(tmp_path / "s.toml", effective_toml(settings))
    assert load_settings(path, environ={}).settings == settings


@pytest.mark.parametrize("text,expected", [("1GiB", 1 << 30), ("512 MiB", 512 << 20), (2048, 2048), ("3GB", 3 * 10**9)])
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text,expected", [("5m", 300.0), (-1, -1.0), ("-1", -1.0), ("1h", 3600.0), (2.5, 2.5)])
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["lots", "1 parsec", True, [1]])
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises(SettingValueError):
        parse_bytes(bad)


def test_endpoint_url() -> None:
    assert Settings(port=1).endpoint_url == "http://127.0.0.1:1"
    assert Settings(host="0.0.0.0", port=2).endpoint_url == "http://127.0.0.1:2"
    assert Settings(host="::1", port=3).endpoint_url == "http://[::1]:3"


def test_remotes_are_read_kept_private_and_never_printed(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[remotes.lan]\nurl = "http://gpu-box:8000"\napi_key = "sk-secret"\n'
                                      'timeout = "2m"\n[remotes.box]\nurl = "http://lan-box:11434"\nkind = "ollama"\n'
                                      'prefix = "box:"\n[remotes.broken]\nkind = "openai"\n')
    os.chmod(path, 0o644)
    loaded = load_settings(path, environ={})
    lan, box = loaded.settings.remotes["lan"], loaded.settings.remotes["box"]
    assert (lan.url, lan.kind, lan.api_key, lan.timeout_s) == ("http://gpu-box:8000", "openai", "sk-secret", 120.0)
    assert (box.kind, box.prefix, box.api_key) == ("ollama", "box:", "")
    assert "broken" not in loaded.settings.remotes and any("needs url" in str(p) for p in loaded.problems)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds an API key
    printed = effective_toml(loaded.settings)
    assert "sk-secret" not in printed and "(set)" in printed
    save_setting(path, "auto_yield", False)  # a tray toggle keeps the file private
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "sk-secret" in path.read_text()
