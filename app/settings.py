"""The one settings object of the app: TOML file, environment and command line feed it.

Owned by the desktop work (issue 8), which adds loading from TOML with per-key
validation; the daemon (issue 7) reads it. Defaults here are what a fresh
install runs with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 11480  # clashes with neither Ollama (11434), LM Studio (1234) nor llama.cpp (8080)


@dataclass(frozen=True)
class ModelSettings:
    """Per-model overrides, keyed by model name in [models."name"]."""
    priority: int = 0                 # higher keeps memory longer under pressure
    min_bytes: int = 0                # pinned minimum the broker never reclaims below
    max_bytes: int | None = None      # cap on what this model may hold
    engine: str = "auto"              # "auto" | "torch" | "llamacpp"
    context_length: int | None = None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_non_loopback: bool = False       # binding elsewhere needs this and a token
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the dashboard's own
    default_model: str = ""                # "" = the bundled SmolLM2
    keep_alive_s: float = 300.0            # idle unload, as Ollama's default 5 minutes
    max_queue: int = 16                    # per model; a full queue answers busy
    max_body_bytes: int = 8 << 20
    num_slots: int = 8                     # torch engine batch slots
    backend: str = "auto"                  # kvcached backend
    headroom_bytes: int = 1 << 30
    monitor_interval_s: float = 0.05
    auto_yield: bool = True
    model_dirs: tuple[str, ...] = ()
    scan_ollama: bool = True
    scan_lmstudio: bool = True
    scan_hf_cache: bool = True
    models: dict[str, ModelSettings] = field(default_factory=dict)
