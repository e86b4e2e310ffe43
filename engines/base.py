"""The one engine interface that the torch and llama.cpp engines implement.

An engine serves one model. It loads and unloads, streams generations for
typed requests, embeds, reports memory, and answers the broker's verbs
(trim, drop cached prefixes, pause, resume, unload). Everything here is
thread-safe: the HTTP layer calls from many threads, the broker from its own.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engines.types import (
    EmbeddingResult,
    GenerateRequest,
    LoadProgress,
    MemoryReport,
    ModelState,
    StreamChunk,
)

ProgressCallback = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class ModelInfo:
    """What the GGUF metadata (or config) says of a model; filled by the registry."""
    name: str                      # as clients address it, e.g. "smollm2:135m-instruct-q4_1"
    path: str                      # file (GGUF) or folder (safetensors); "" for synthetic
    family: str = "llama"          # general.architecture
    parameter_count: int = 0
    quantization: str = ""         # e.g. "Q4_1", "BF16"
    context_length: int = 2048
    can_infill: bool = False
    size_bytes: int = 0
    digest: str = ""               # sha256 of the file where known (Ollama blobs)
    modified_at: float = 0.0       # unix time
    source: str = "local"          # "bundled", "ollama", "lmstudio", "hf", "folder", "synthetic"
    chat_template: str = ""
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


class Engine(abc.ABC):
    """One model, served. Subclasses: engines.torch.TorchEngine, engines.llamacpp.LlamaCppEngine."""

    kind: str = "abstract"
    fallback_note: str = ""        # why another engine than the device's own serves it (a routing detour or failed load)
    load_phases: dict = {}         # {phase: seconds} of the last load (engines/phases.py); read-only here

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    # --- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    def load(self, progress: ProgressCallback | None = None) -> None:
        """Read weights and get ready to serve. Idempotent."""

    @abc.abstractmethod
    def unload(self) -> int:
        """Free weights and KV; returns bytes given back. Waits for requests in flight."""

    @property
    @abc.abstractmethod
    def state(self) -> ModelState: ...

    # --- serving ---------------------------------------------------------
    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        """Stream a generation. The last chunk carries finish_reason and usage.
        Resumes a paused model first. Raises EngineBusy when the queue is full,
        ContextOverflow when the prompt cannot fit, InfillUnsupported for FIM
        on a model without FIM tokens. request.cancel() stops it early."""

    @abc.abstractmethod
    def embed(self, texts: list[str], truncate: bool = False) -> EmbeddingResult:
        """One pooled, L2-normalized vector per text. A text over the context raises
        ContextOverflow, or with truncate keeps the tokens that fit (Ollama's truncate)."""

    @abc.abstractmethod
    def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str: ...

    # --- memory and the broker's verbs -----------------------------------
    @abc.abstractmethod
    def memory(self) -> MemoryReport: ...

    def load_estimate(self) -> int:
        """Bytes a load will hold before its first request (weights, and KV allocated
        whole at load), read from the metadata without loading: what the broker admits
        before the load starts. Engines whose weights change size in memory say so."""
        return self.info.size_bytes

    @abc.abstractmethod
    def trim(self) -> int:
        """Give back KV pages that hold no live token; returns bytes."""

    @abc.abstractmethod
    def drop_prefixes(self) -> int:
        """Forget cached prefixes of finished conversations; returns bytes."""

    @abc.abstractmethod
    def pause(self) -> int:
        """Move live KV to host memory and give back its device pages; returns bytes.
        Waits until no step runs; the next request resumes."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Bring paused KV back, bit-exact. Idempotent."""

    def relieve_host(self) -> int:
        """The host is short of memory (kvcached/broker/host_relief.py): give back host memory
        this model holds for later (paused KV to disk, kept staging buffers, parked
        conversations) without losing what a request needs; returns bytes. Default: none."""
        return 0

    def weights_to_host(self) -> int:
        """The rung after pause: KV and weights to host memory, nothing of the model left on
        the device, ready again at copy speed on the next request; returns bytes. Engines
        that cannot give nothing (0), and the broker's next rung unloads them."""
        return 0

    @property
    @abc.abstractmethod
    def busy(self) -> bool:
        """True while a request runs or waits."""

    @property
    @abc.abstractmethod
    def idle_since(self) -> float:
        """time.monotonic() when the last request finished (now, while busy)."""

    def stalled_s(self) -> float | None:
        """Seconds this engine's worker has had work without progress, for the daemon's
        watchdog; None while idle, or where the engine has no worker of its own."""
        return None

    def finish_background_work(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) for what the load left to do while idle (the torch engine
        compiles and captures its decode graphs then); True when nothing is left. For warm-ups
        that load a model only to fill caches, then unload it."""
        return True

    def attach_broker(self, handle: object | None) -> None:
        """The broker registered this engine (a kvcached ClientHandle; None: it left).
        Engines that admit work against the broker's budget keep it; others ignore it."""
