"""Loading the one Settings object from the TOML file, the environment and the command line.

Later sources win: defaults < settings.toml < EBBTIDE_* environment < command
line. A bad value never stops the daemon: it is logged with the key that
carries it and what the key accepts, and that key keeps its default (or the
value of an earlier source). A file that is not TOML at all is logged the same
way and ignored as a whole. Every value goes through the one parser of its key
in app/settings.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from app import env
from app.paths import app_paths
from app.settings import (
    ALIASES, FIELDS, MODEL_ALIASES, MODEL_FIELDS, REMOTE_ALIASES, REMOTE_FIELDS, ModelSettings, RemoteSettings,
    Settings, SettingValueError,
)

log = logging.getLogger(__name__)

# Which environment variable sets which key (names declared in app/env.py).
ENV_FIELDS: dict[str, str] = {
    env.HOST: "host", env.PORT: "port", env.BACKEND: "backend", env.DEFAULT_MODEL: "default_model",
    env.LOG_LEVEL: "log_level", env.KEEP_ALIVE: "keep_alive_s", env.HEADROOM: "headroom_bytes",
    env.AUTO_YIELD: "auto_yield", env.MODELS: "model_dirs", env.ORIGINS: "allowed_origins",
}


@dataclass(frozen=True)
class SettingsProblem:
    """One value that was not used: where it came from, its key, and why."""
    source: str   # the file's path, an environment variable's name, or "command line"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}; the default is used"


@dataclass(frozen=True)
class LoadedSettings:
    settings: Settings
    path: Path                                   # the settings file (it may not exist)
    problems: tuple[SettingsProblem, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)  # key -> "file" | env name | "command line"


def settings_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    override = environ.get(env.CONFIG)
    return Path(override) if override else app_paths().settings_file


def read_file(path: Path) -> tuple[dict, list[SettingsProblem]]:
    """The file's table, or {} and a problem when it is missing parts or is not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), []
    except FileNotFoundError:
        return {}, []
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return {}, [SettingsProblem(str(path), "(whole file)", f"not valid TOML ({exc})")]
    except OSError as exc:
        return {}, [SettingsProblem(str(path), "(whole file)", f"cannot be read ({exc.strerror})")]


def parse_table(raw: Mapping[str, object], fields: Mapping[str, Callable[[object], object]],
                aliases: Mapping[str, str], source: str,
                prefix: str = "") -> tuple[dict[str, object], list[SettingsProblem]]:
    """Parse each key of raw with its parser; unknown keys and bad values become problems."""
    values: dict[str, object] = {}
    problems: list[SettingsProblem] = []
    for raw_key, raw_value in raw.items():
        key = aliases.get(raw_key, raw_key)
        parse = fields.get(key)
        if parse is None:
            problems.append(SettingsProblem(source, prefix + raw_key, "unknown key, ignored"))
            continue
        try:
            values[key] = parse(raw_value)
        except SettingValueError as exc:
            problems.append(SettingsProblem(source, prefix + raw_key, str(exc)))
    return values, problems


# Sections of named tables: [models."name"], [remotes."name"] -> (fields, aliases, dataclass, required keys).
TABLES: dict[str, tuple[Mapping, Mapping, type, tuple[str, ...]]] = {
    "models": (MODEL_FIELDS, MODEL_ALIASES, ModelSettings, ()),
    "remotes": (REMOTE_FIELDS, REMOTE_ALIASES, RemoteSettings, ("url",)),
}


def parse_tables(section: str, raw: object, source: str) -> tuple[dict[str, object], list[SettingsProblem]]:
    """[section."name"] tables; a bad value falls back to that key's default; a table missing a
    required key is left out."""
    fields, aliases, cls, required = TABLES[section]
    if not isinstance(raw, dict):
        return {}, [SettingsProblem(source, section, f"expected tables such as [{section}.\"name\"]")]
    tables: dict[str, object] = {}
    problems: list[SettingsProblem] = []
    for name, table in raw.items():
        if not isinstance(table, dict):
            problems.append(SettingsProblem(source, f"{section}.{name}", "expected a table"))
            continue
        values, found = parse_table(table, fields, aliases, source, f"{section}.{name}.")
        problems += found
        missing = [key for key in required if key not in values]
        if missing:
            problems.append(SettingsProblem(source, f"{section}.{name}", f"needs {', '.join(missing)}; left out"))
            continue
        tables[name] = cls(**values)
    return tables, problems


def parse_models(raw: object, source: str) -> tuple[dict[str, ModelSettings], list[SettingsProblem]]:
    return parse_tables("models", raw, source)  # type: ignore[return-value]


def keep_secrets_private(path: Path, remotes: Mapping[str, RemoteSettings]) -> None:
    """A settings file that holds a remote's API key is readable by its owner only (0600)."""
    if not any(r.api_key for r in remotes.values()) or os.name != "posix":
        return
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s holds an API key: made it readable by you only (0600)", path)
    except OSError as exc:
        log.warning("cannot make %s private (it holds an API key): %s", path, exc)


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, object] | None = None) -> LoadedSettings:
    """The effective settings; every problem is logged and returned, none raises."""
    environ = os.environ if environ is None else environ
    path = settings_path(environ) if path is None else path
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    raw, problems = read_file(path)
    top = {k: v for k, v in raw.items() if k not in TABLES}
    found, file_problems = parse_table(top, FIELDS, ALIASES, str(path))
    problems += file_problems
    values.update(found)
    sources.update(dict.fromkeys(found, "file"))
    for section in TABLES:
        if section in raw:
            values[section], table_problems = parse_tables(section, raw[section], str(path))
            problems += table_problems
            sources[section] = "file"
    keep_secrets_private(path, values.get("remotes") or {})
    for name, key in ENV_FIELDS.items():
        if environ.get(name) is None:
            continue
        found, env_problems = parse_table({key: environ[name]}, FIELDS, {}, name)
        problems += env_problems
        values.update(found)
        sources.update(dict.fromkeys(found, name))
    found, cli_problems = parse_table(dict(overrides or {}), FIELDS, ALIASES, "command line")
    problems += cli_problems
    values.update(found)
    sources.update(dict.fromkeys(found, "command line"))
    for problem in problems:
        log.warning("%s", problem)
    return LoadedSettings(Settings(**values), path, tuple(problems), sources)


def to_toml_value(value: object) -> object:
    """Settings values in the shape TOML can write (no None, tuples as lists)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, RemoteSettings):  # what is printed never shows the key
        return {k: ("(set)" if k == "api_key" and v else v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, ModelSettings):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, dict):
        return {k: to_toml_value(v) for k, v in value.items()}
    return value


def effective_toml(settings: Settings) -> str:
    """The effective values as a TOML document (what `ebbtide config` prints)."""
    table = {f.name: to_toml_value(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    for section in TABLES:
        if not table[section]:
            del table[section]  # an empty table reads as noise
    return tomli_w.dumps(table)


def save_setting(path: Path, key: str, value: object) -> None:
    """Write one top-level key (a toggle from the tray), keeping every other line's value.

    A file that is not TOML is kept aside as settings.toml.bad rather than overwritten blind.
    """
    if key not in FIELDS:
        raise SettingValueError(f"unknown key {key!r}")
    FIELDS[key](value)  # refuse to write what would not load back
    raw, problems = read_file(path)
    if problems and path.exists():
        path.replace(path.with_suffix(".toml.bad"))
        log.warning("%s was not valid TOML; kept it as %s", path, path.with_suffix(".toml.bad"))
    raw[key] = to_toml_value(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    # The same mode as the file it replaces: a file kept 0600 for an API key stays 0600.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(tomli_w.dumps(raw))
    os.chmod(tmp, mode)
    tmp.replace(path)  # atomic: a crash mid-write never leaves half a file
