"""Where Ebbtide keeps things, through platformdirs: config (settings.toml), data
(models folder), logs, and the runtime dir (control token, single-instance lock).

Every path can be redirected with EBBTIDE_HOME (tests, portable installs);
environment names are declared in app/env.py.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from app import env

APP_NAME = "ebbtide"


@dataclass(frozen=True)
class AppPaths:
    config_dir: Path
    data_dir: Path
    log_dir: Path
    runtime_dir: Path
    cache_dir: Path      # compiled kernels (engines/compile_cache.py): safe to delete, rebuilt on demand

    @property
    def settings_file(self) -> Path:
        return self.config_dir / "settings.toml"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def kv_dir(self) -> Path:
        """Cached conversations kept on disk (models with keep_kv_on_disk)."""
        return self.data_dir / "kv"

    @property
    def token_file(self) -> Path:
        return self.runtime_dir / "control-token"

    @property
    def lock_file(self) -> Path:
        return self.runtime_dir / "ebbtide.lock"

    def ensure(self) -> "AppPaths":
        for folder in (self.config_dir, self.data_dir, self.log_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # The runtime dir holds the control token: only this user may enter it.
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.runtime_dir, 0o700)
        return self


def app_paths() -> AppPaths:
    """The paths for this user, or under $EBBTIDE_HOME when it is set."""
    home = os.environ.get(env.HOME)
    if home:
        root = Path(home)
        return AppPaths(root / "config", root / "data", root / "logs", root / "run", root / "cache")
    with warnings.catch_warnings():
        # platformdirs warns on every call when XDG_RUNTIME_DIR is unset (containers, ssh,
        # su) and falls back to /tmp/runtime-$UID: a fine place for the token and lock, so
        # the CLI stays quiet; the daemon says it once at start (runtime_dir_note).
        warnings.simplefilter("ignore")
        runtime = platformdirs.user_runtime_dir(APP_NAME, ensure_exists=False)
    return AppPaths(
        Path(platformdirs.user_config_dir(APP_NAME)),
        Path(platformdirs.user_data_dir(APP_NAME)),
        Path(platformdirs.user_log_dir(APP_NAME)),
        Path(runtime),
        Path(platformdirs.user_cache_dir(APP_NAME)),
    )


def runtime_dir_note(paths: AppPaths) -> str | None:
    """A line for the daemon's start when the runtime dir is platformdirs' fallback."""
    if os.environ.get(env.HOME) or os.name != "posix" or os.environ.get("XDG_RUNTIME_DIR") \
            or not str(paths.runtime_dir).startswith("/tmp/"):
        return None
    return (f"XDG_RUNTIME_DIR is not set: the control token and lock are kept in {paths.runtime_dir}")
