"""The one settings object of the app: TOML file, environment and command line feed it.

Owned by the desktop work (issue 8); the daemon (issue 7) reads it. Defaults
here are what a fresh install runs with. Each key has one parser in FIELDS (and
MODEL_FIELDS for [models."name"] tables): the file, the environment and the
command line all go through the same parser, so a value means the same thing
wherever it is written. app/settings_file.py does the loading and the falling
back to defaults.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from engines.config import ENGINE_KINDS, EngineConfig
from kvcached.config import BACKENDS, KvcachedConfig

DEFAULT_PORT = 11480  # clashes with neither Ollama (11434), LM Studio (1234) nor llama.cpp (8080)
ENGINES = ENGINE_KINDS
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingValueError(ValueError):
    """A value that a key does not accept; the message says what it accepts."""


@dataclass(frozen=True)
class ModelSettings:
    """Per-model overrides, keyed by model name in [models."name"]."""
    priority: int = 0                 # higher keeps memory longer under pressure
    min_bytes: int = 0                # pinned minimum the broker never reclaims below
    max_bytes: int | None = None      # cap on what this model may hold
    engine: str = "auto"              # "auto" | "torch" | "llamacpp"
    context_length: int | None = None
    keep_alive_s: float | None = None  # None: the global keep_alive_s
    keep_kv_on_disk: bool = False     # torch engine: cached conversations survive unloads and restarts


@dataclass(frozen=True)
class RemoteSettings:
    """A server elsewhere whose models are listed here, in [remotes."name"] (engines/remote/)."""
    url: str = ""                     # http://gpu-box:8000 (OpenAI-compatible) or http://lan-box:11434 (Ollama)
    kind: str = "openai"              # "openai" | "ollama"
    prefix: str = ""                  # listed as prefix + the remote's name; "" means "<name>/"
    api_key: str = ""                 # the settings file is kept 0600 while it holds one
    timeout_s: float = 600.0          # longest wait for the next byte of an answer


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_non_loopback: bool = False       # binding elsewhere needs this and a token
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the dashboard's own
    default_model: str = ""                # "" = the bundled SmolLM2
    keep_alive_s: float = 300.0            # idle unload, as Ollama's default 5 minutes; <0 never
    max_queue: int = EngineConfig.max_queue  # per model, as Ollama; a full queue answers busy
    max_body_bytes: int = 8 << 20
    num_slots: int = EngineConfig.torch_num_slots  # requests decoded together per model (both engines)
    llama_threads: int = 0                 # llama.cpp threads; 0: one per physical core
    backend: str = KvcachedConfig.backend  # kvcached backend: decides the device, once (app/daemon.py)
    headroom_bytes: int = KvcachedConfig.headroom_bytes
    host_low_bytes: int = KvcachedConfig.host_low_bytes  # host memory below which paused KV spills to disk
    monitor_interval_s: float = KvcachedConfig.monitor_interval_s
    auto_yield: bool = KvcachedConfig.auto_yield
    model_dirs: tuple[str, ...] = ()
    scan_ollama: bool = EngineConfig.scan_ollama
    scan_lmstudio: bool = EngineConfig.scan_lmstudio
    scan_hf_cache: bool = EngineConfig.scan_hf_cache
    models: dict[str, ModelSettings] = field(default_factory=dict)
    remotes: dict[str, RemoteSettings] = field(default_factory=dict)
    log_level: str = "INFO"
    budget_bytes: int = 0                  # all models together (weights and KV); 0: what the device allows
    synthetic_models: bool = EngineConfig.include_synthetic  # list random-weight "synthetic/<config>" models (benchmarks)
    admission_timeout_s: float = EngineConfig.admission_timeout_s  # a request waiting this long for GPU memory answers 503
    load_timeout_s: float = 600.0          # a request waiting this long for its model's load answers 503
    torch_llamacpp_numerics: bool = EngineConfig.torch_llamacpp_numerics  # torch engine on the CPU: llama.cpp's exact tokens, slower
    kv_disk_max_bytes: int = EngineConfig.kv_disk_max_bytes  # the KV disk tier's bound (models with keep_kv_on_disk)
    max_context: int = EngineConfig.max_context  # default context: the trained length, at most this (engines/context.py)
    prompt_cache_bytes: int = EngineConfig.llama_prompt_cache_bytes  # llama.cpp engine: idle conversations kept in RAM

    @property
    def endpoint_url(self) -> str:
        """The URL a local client reaches the daemon at (a wildcard bind is reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def model(self, name: str) -> ModelSettings:
        """The overrides for one model, or the defaults when it has none."""
        return self.models.get(name, ModelSettings())


# --- parsers: one per kind of value --------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
               "tb": 1000**4, "tib": 1 << 40}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingValueError(f"expected true or false, got {value!r}")


def parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise SettingValueError(f"expected a string, got {value!r}")
    return value


def parse_int(value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingValueError(f"expected a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingValueError(f"{value} is outside {low}..{high if high is not None else ''}")
    return value


def parse_bytes(value: object) -> int:
    """A byte count: 1073741824, "1GiB", "512 MiB", "2GB"."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise SettingValueError(f"expected a size such as 1073741824 or \"1GiB\", got {value!r}")
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    return parse_int(value, low=0)


def parse_duration(value: object) -> float:
    """Seconds: 300, 2.5, "5m", "1h", "-1" (never); as Ollama's keep_alive."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([a-z]*)\s*", value.lower())
        if match is None or match.group(2) not in _DURATION_UNITS:
            raise SettingValueError(f"expected a duration such as 300, \"5m\" or \"1h\", got {value!r}")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingValueError(f"expected a duration such as 300, \"5m\" or \"1h\", got {value!r}")
    return float(value)


def parse_str_list(value: object) -> tuple[str, ...]:
    """A list of strings; a string is split on commas (as environment values are written)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise SettingValueError(f"expected a list of strings, got {value!r}")


def one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = parse_str(value)
        if text not in choices:
            raise SettingValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return parse


def positive_interval(value: object) -> float:
    seconds = parse_duration(value)
    if not 0.001 <= seconds <= 10:
        raise SettingValueError(f"expected a period between 0.001 and 10 seconds, got {value!r}")
    return seconds


def positive_seconds(seconds: float) -> float:
    if not seconds > 0:
        raise SettingValueError(f"expected a duration above 0, got {seconds!r}")
    return seconds


def optional(parse: Callable[[object], object]) -> Callable[[object], object]:
    """TOML has no null: the empty string or "none" stands for "not set"."""
    def parse_optional(value: object) -> object:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return parse(value)
    return parse_optional


FIELDS: dict[str, Callable[[object], object]] = {
    "host": parse_str,
    "port": lambda v: parse_int(v, 1, 65535),
    "allow_non_loopback": parse_bool,
    "allowed_origins": parse_str_list,
    "default_model": parse_str,
    "keep_alive_s": parse_duration,
    "max_queue": lambda v: parse_int(v, 1, 10_000),
    "max_body_bytes": parse_bytes,
    "num_slots": lambda v: parse_int(v, 1, 1024),
    "llama_threads": lambda v: parse_int(v, 0, 1024),
    "backend": one_of(BACKENDS),
    "headroom_bytes": parse_bytes,
    "host_low_bytes": parse_bytes,
    "monitor_interval_s": positive_interval,
    "auto_yield": parse_bool,
    "model_dirs": parse_str_list,
    "scan_ollama": parse_bool,
    "scan_lmstudio": parse_bool,
    "scan_hf_cache": parse_bool,
    "log_level": lambda v: one_of(LOG_LEVELS)(parse_str(v).upper()),
    "budget_bytes": parse_bytes,
    "synthetic_models": parse_bool,
    "admission_timeout_s": lambda v: positive_seconds(parse_duration(v)),
    "load_timeout_s": lambda v: positive_seconds(parse_duration(v)),
    "torch_llamacpp_numerics": parse_bool,
    "max_context": lambda v: parse_int(v, 256, 1 << 24),
    "kv_disk_max_bytes": parse_bytes,
    "prompt_cache_bytes": parse_bytes,
}

# Names people write in the file that mean a field above (Ollama calls it keep_alive).
ALIASES: dict[str, str] = {"keep_alive": "keep_alive_s", "headroom": "headroom_bytes",
                           "monitor_interval": "monitor_interval_s", "model": "default_model"}

MODEL_FIELDS: dict[str, Callable[[object], object]] = {
    "priority": lambda v: parse_int(v, -1000, 1000),
    "min_bytes": parse_bytes,
    "max_bytes": optional(parse_bytes),
    "engine": one_of(ENGINES),
    "context_length": optional(lambda v: parse_int(v, 16, 1 << 24)),
    "keep_alive_s": optional(parse_duration),
    "keep_kv_on_disk": parse_bool,
}
def parse_url(value: object) -> str:
    text = parse_str(value).strip()
    if not re.match(r"^https?://[^\s/]+", text):
        raise SettingValueError(f"expected an http:// or https:// URL, got {value!r}")
    return text


REMOTE_FIELDS: dict[str, Callable[[object], object]] = {
    "url": parse_url,
    "kind": one_of(("openai", "ollama")),
    "prefix": parse_str,
    "api_key": parse_str,
    "timeout_s": lambda v: positive_seconds(parse_duration(v)),
}
REMOTE_ALIASES: dict[str, str] = {"timeout": "timeout_s", "key": "api_key"}

MODEL_ALIASES: dict[str, str] = {"min": "min_bytes", "max": "max_bytes", "pinned": "min_bytes",
                                 "keep_alive": "keep_alive_s"}
