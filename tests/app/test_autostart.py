"""Start at login: the XDG entry written and removed for real; plist and Run key content checked."""
from __future__ import annotations

import configparser
import plistlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from app import desktop_entry, resources
from app.login_item import UnsupportedPlatform, for_platform

COMMAND = ["/opt/my apps/ebbtide", "--flag=100%"]


def test_platform_table() -> None:
    assert for_platform("linux").__name__.endswith("_linux")
    assert for_platform("darwin").__name__.endswith("_darwin")
    assert for_platform("win32").__name__.endswith("_windows")
    with pytest.raises(UnsupportedPlatform):
        for_platform("sunos5")


def test_xdg_entry_written_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    linux = for_platform("linux")
    assert not linux.is_enabled()
    path = linux.enable(COMMAND)
    assert path == tmp_path / "autostart" / "ebbtide.desktop" and linux.is_enabled()
    entry = configparser.ConfigParser(interpolation=None)
    entry.read(path)
    section = entry["Desktop Entry"]
    assert section["Type"] == "Application" and section["Name"] == "Ebbtide"
    # The spec's quoting: a shell-like split (after %% -> %) gives the command back.
    assert shlex.split(section["Exec"].replace("%%", "%")) == COMMAND
    assert linux.disable() and not path.exists() and not linux.is_enabled()
    assert linux.disable() is False


def test_cli_autostart_round_trip(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "EBBTIDE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    root = Path(__file__).resolve().parents[2]

    def run(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "autostart", action], env=env, cwd=root,
                              capture_output=True, text=True, timeout=60)

    assert "off" in run("status").stdout
    assert run("enable").returncode == 0 and (tmp_path / "xdg/autostart/ebbtide.desktop").is_file()
    assert "on" in run("status").stdout
    assert run("disable").returncode == 0 and not (tmp_path / "xdg/autostart/ebbtide.desktop").exists()


def test_launch_agent_plist() -> None:
    plist = plistlib.loads(for_platform("darwin").content(COMMAND).encode())
    assert plist["ProgramArguments"] == COMMAND and plist["RunAtLoad"] is True
    assert plist["KeepAlive"] is False and plist["Label"].endswith(".tray")


def test_run_key_value() -> None:
    windows = for_platform("win32")
    assert windows.content(["C:\\Program Files\\Ebbtide\\ebbtide.exe", "tray"]) == \
        '"C:\\Program Files\\Ebbtide\\ebbtide.exe" tray'
    assert windows.location().startswith("HKEY_CURRENT_USER\\Software\\Microsoft\\Windows\\CurrentVersion\\Run")


def test_installer_files() -> None:
    """The desktop entry and service unit ship inside the package (importlib.resources)."""
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive in desktop entries
    entry.read_string(resources.read_text("linux", "ebbtide.desktop"))
    section = entry["Desktop Entry"]
    assert (section["Type"], section["Exec"], section["Icon"]) == ("Application", "ebbtide", "ebbtide")
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string(resources.read_text("linux", "ebbtide.service"))
    assert unit["Service"]["ExecStart"].endswith("ebbtide serve")
    assert unit["Install"]["WantedBy"] == "default.target"


def test_desktop_entry_and_icons_installed_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    written = desktop_entry.install(COMMAND)
    entry_file = tmp_path / "applications" / "ebbtide.desktop"
    icon = tmp_path / "icons" / "hicolor" / "256x256" / "apps" / "ebbtide.png"
    assert entry_file in written and icon in written and desktop_entry.is_installed()
    assert icon.read_bytes() == resources.read_bytes("icons", "ebbtide-256.png")
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str
    entry.read(entry_file)
    section = entry["Desktop Entry"]
    assert shlex.split(section["Exec"].replace("%%", "%")) == COMMAND
    assert section["Icon"] == "ebbtide" and section["Name"] == "Ebbtide"
    assert sorted(desktop_entry.uninstall()) == sorted(written)
    assert not entry_file.exists() and not icon.exists() and desktop_entry.uninstall() == []


def test_cli_desktop_round_trip(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "EBBTIDE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    root = Path(__file__).resolve().parents[2]

    def run(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "desktop", action], env=env, cwd=root,
                              capture_output=True, text=True, timeout=60)

    entry_file = tmp_path / "data/applications/ebbtide.desktop"
    assert "not installed" in run("status").stdout
    assert run("install").returncode == 0 and entry_file.is_file()
    assert (tmp_path / "data/icons/hicolor/64x64/apps/ebbtide.png").is_file()
    # No `ebbtide` on this PATH: the entry starts the tray with this python, as the login item does.
    exec_line = next(line for line in entry_file.read_text().splitlines() if line.startswith("Exec="))
    assert shlex.split(exec_line[len("Exec="):].replace("%%", "%")) == [sys.executable, "-m", "app.cli"]
    assert "installed" in run("status").stdout
    assert run("uninstall").returncode == 0 and not entry_file.exists()
