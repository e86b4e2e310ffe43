"""LlamaCppEngine: a GGUF model served through llama.cpp, obeying the broker per model.

llama.cpp owns its KV buffer, so the broker's verbs map onto whole contexts:
trim gives back nothing (the buffer is one allocation), drop_prefixes frees
an idle context and forgets its cached conversation, pause saves the context
state to host memory and frees the context (weights stay), resume restores
it, unload frees everything. The weights load through llama_cpp's thin
wrappers with params from options.py (use_extra_bufts off: the AMX segfault).
All context work runs on one worker thread (worker.py): generation as
continuous batching over the context's slots (batcher.py: many requests
decode together, each in its own sequence with its own sampler), and the
broker's verbs between two steps. A full queue answers EngineBusy. Embeddings use a second, small context
with embeddings on, over the same weights, made on first use.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TypeVar

import llama_cpp
from llama_cpp import _internals as internals

from engines.base import Engine, ModelInfo, ProgressCallback
from engines.broker_client import load_estimate
from engines.config import EngineConfig
from engines.context import served_context
from engines.errors import ContextOverflow, ModelLoadError
from engines.llamacpp import embedding, options
from engines.llamacpp.batcher import Batcher
from engines.llamacpp.generation import Sequence
from engines.llamacpp.native import route_native_logs, token_piece
from engines.llamacpp.prompt import PromptBuilder
from engines.llamacpp.prompt_cache import PromptCache
from engines.llamacpp.session import Session, kv_bytes_per_token
from engines.llamacpp.state import PausedState, discard, pause_session, resume_session, spill
from engines.llamacpp.stream import TokenStream
from engines.llamacpp.worker import Worker, WorkerStopped
from engines.progress import ProgressReporter
from engines.types import EmbeddingResult, GenerateRequest, MemoryReport, ModelState, StreamChunk

log = logging.getLogger(__name__)
T = TypeVar("T")


class LlamaCppEngine(Engine):
    kind = "llamacpp"

    def __init__(self, info: ModelInfo, config: EngineConfig | None = None) -> None:
        super().__init__(info)
        self.config = config or EngineConfig()
        self.n_ctx = options.context_n_ctx(self.config, info)
        self._load_lock = threading.RLock()   # load/unload, and tokenizing against a live model
        self._state = ModelState.UNLOADED
        self._model: internals.LlamaModel | None = None
        self._prompts: PromptBuilder | None = None
        self._worker: Worker | None = None
        self._batcher: Batcher | None = None
        self._session: Session | None = None        # touched on the worker thread only
        self._paused: PausedState | None = None
        self._prompt_cache = PromptCache(self.config.llama_prompt_cache_bytes)   # idle conversations, on the host
        self._embedder: embedding.Embedder | None = None
        self._on_gpu = False
        self._weights_bytes = 0
        self._kv_per_token = 0
        self._idle_since = time.monotonic()   # while no worker exists (unloaded)
        self._unreported_load_ns = 0          # the load's time, reported by its first request

    # --- lifecycle ---------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            reporter = ProgressReporter(self.info.name, progress)
            started = time.perf_counter_ns()
            self._state = ModelState.LOADING
            try:
                self._load_model(reporter)
            except BaseException:
                self._free_native()
                self._state = ModelState.UNLOADED
                raise
            self._state = ModelState.LOADED
            self._unreported_load_ns = time.perf_counter_ns() - started
            reporter.report(1.0, "ready")

    def _load_model(self, reporter: ProgressReporter) -> None:
        route_native_logs()
        reporter.report(0.0, "reading")
        params = options.model_params(self.config, lambda f: reporter.report(0.9 * f, "reading"))
        try:
            self._model = internals.LlamaModel(path_model=self.info.path, params=params.params, verbose=True)
        except ValueError as exc:   # the wrapper's way of saying "NULL model"
            raise ModelLoadError(f"{self.info.name}: llama.cpp could not load {self.info.path}: {exc}") from exc
        self._on_gpu = params.on_gpu
        self._weights_bytes = int(llama_cpp.llama_model_size(self._model.model))
        self._kv_per_token = kv_bytes_per_token(self._model)
        self._prompts = PromptBuilder(self._model, self.info.chat_template)
        reporter.report(0.95, "allocating")
        self._session = Session(self._model, self._context_params(), self._prompt_cache)
        self._worker = Worker(self.info.name, self.config.max_queue)
        self._batcher = Batcher(self.info.name, self.config.max_queue, self._ready_session,
                                self._take_load_ns, self._worker.wake)
        self._worker.stepper = self._batcher
        log.info("loaded %s with llama.cpp: %d MB weights, n_ctx %d, %d slots, %d threads, %s", self.info.name,
                 self._weights_bytes >> 20, self._session.n_ctx, len(self._session.slots),
                 self.config.resolved_threads(), "GPU" if self._on_gpu else "CPU")

    def _context_params(self) -> llama_cpp.llama_context_params:
        return options.context_params(self.config, self.n_ctx)

    def unload(self) -> int:
        with self._load_lock:
            if self._model is None:
                return 0
            freed = self.memory().total_bytes
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.call(self._finish_then_free)   # after every request in the batch has ended
                worker.stop()
                self._idle_since = worker.idle_since
            self._batcher = None
            self._free_native()
            self._state = ModelState.UNLOADED
            log.info("unloaded %s: %d MB given back", self.info.name, freed >> 20)
            return freed

    def _finish_then_free(self) -> int:
        """Worker thread: run the batch until every admitted and queued request has ended
        (no new ones come: generate() submits under the load lock unload holds)."""
        batcher = self._batcher
        while batcher is not None and batcher.has_work:
            batcher.step()
        return self._free_contexts()

    def _free_contexts(self) -> int:
        freed = self._held_kv_bytes()
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        return freed

    def _free_native(self) -> None:
        self._free_contexts()
        self._prompt_cache.clear()
        discard(self._paused)
        self._paused = None
        self._prompts = None
        if self._model is not None:
            self._model.close()
            self._model = None

    @property
    def state(self) -> ModelState:
        return self._state

    # --- serving -------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        self.load()
        out: queue.Queue = queue.Queue()
        # Under the lock, so an unload cannot free the model while the prompt is tokenized
        # nor stop the worker between building the prompt and queueing it.
        with self._load_lock:
            if self._prompts is None or self._batcher is None:   # unloaded since load() above
                return self.generate(request)
            prompt = self._prompts.build(request)
            n_ctx = self._context_for(request)
            if len(prompt) >= n_ctx:
                raise ContextOverflow(f"the prompt is {len(prompt)} tokens; {self.info.name} is served with "
                                      f"a context of {n_ctx} (one token must stay free to generate)")
            self._batcher.submit(Sequence(request, prompt, out.put, on_end=lambda: out.put(TokenStream.END),
                                          vocab=self._model.vocab, n_ctx=n_ctx))
        return TokenStream(request, out)

    def _context_for(self, request: GenerateRequest) -> int:
        """The context this request gets. A num_ctx above the served one grows the context
        (up to the trained length), as Ollama reloads for it: the next step recreates the
        session at the new size (running sequences re-read what they held; idle caches are
        dropped). A smaller one bounds this request."""
        asked = request.num_ctx
        if asked is None:
            return self.n_ctx
        trained = self.info.context_length or asked
        if asked > self.n_ctx:   # at most the trained length and what the KV budget holds
            grown = served_context(trained, asked, self._kv_per_token, self.config.kv_budget_bytes)
            self.n_ctx = max(self.n_ctx, grown)
            log.info("%s: context grows to %d tokens (num_ctx %d)", self.info.name, self.n_ctx, asked)
        return min(asked, self.n_ctx)

    def _take_load_ns(self) -> int:
        """The load's (or a resume's) time, once: the request that waited for it reports it."""
        load_ns, self._unreported_load_ns = self._unreported_load_ns, 0
        return load_ns

    def _ready_session(self) -> Session:
        """The context to serve on: resumed if paused, recreated if dropped or grown. Worker thread."""
        assert self._model is not None
        if self._session is not None and self._session.n_ctx < self.n_ctx:
            self._session.close()
            self._session = None
        if self._session is None:
            started = time.perf_counter_ns()
            paused, self._paused = self._paused, None
            self._session = resume_session(self._model, self._context_params(), paused or PausedState({}),
                                           self._prompt_cache)
            self._state = ModelState.LOADED
            self._unreported_load_ns += time.perf_counter_ns() - started
        return self._session

    def embed(self, texts: list[str], truncate: bool = False) -> EmbeddingResult:
        self.load()

        def job() -> EmbeddingResult:
            assert self._model is not None
            if self._embedder is None:
                self._embedder = embedding.Embedder(self._model, self.config, self.info.name, self.n_ctx)
            return self._embedder.embed(texts, truncate)

        with self._load_lock:
            if self._worker is None:   # unloaded since load() above
                return self.embed(texts, truncate)
            future = self._worker.submit(job, is_request=True)
        return future.result()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        self.load()
        with self._load_lock:
            assert self._prompts is not None
            return self._prompts.tokenize(text, add_bos=add_special and self._prompts.add_bos, special=True)

    def detokenize(self, token_ids: list[int]) -> str:
        self.load()
        with self._load_lock:
            assert self._model is not None
            return b"".join(token_piece(self._model.vocab, t) for t in token_ids).decode("utf-8", "replace")

    @property
    def can_infill(self) -> bool:
        self.load()
        return bool(self._prompts and self._prompts.can_infill)

    # --- memory and the broker's verbs ---------------------------------------------
    def _held_kv_bytes(self) -> int:
        held = self._session.n_ctx * self._kv_per_token if self._session is not None else 0
        return held + (self._embedder.kv_bytes if self._embedder is not None else 0)

    def memory(self) -> MemoryReport:
        session, paused = self._session, self._paused
        return MemoryReport(
            weights_bytes=self._weights_bytes if self._model is not None else 0,
            kv_held_bytes=self._held_kv_bytes(),
            kv_live_bytes=session.num_tokens * self._kv_per_token if session is not None else 0,
            paused_host_bytes=paused.host_bytes if paused is not None else 0,
            paused_disk_bytes=paused.disk_bytes if paused is not None else 0,
            prompt_cache_host_bytes=self._prompt_cache.host_bytes,
            on_gpu=self._on_gpu)

    def load_estimate(self) -> int:
        """The file's weights and the context's KV, which llama.cpp allocates whole."""
        return load_estimate(self.info, self.n_ctx)

    def trim(self) -> int:
        return 0   # llama.cpp allocates its KV buffer whole: nothing to give back piecemeal

    def _on_worker(self, fn: Callable[[], T], unloaded: T) -> T:
        """Run a verb on the worker; `unloaded` when there is no model (or it just went)."""
        worker = self._worker
        if worker is None:
            return unloaded
        try:
            return worker.call(fn)
        except WorkerStopped:   # unloaded while the verb waited: nothing left to act on
            return unloaded

    def drop_prefixes(self) -> int:
        """Free an idle context and forget the conversations it cached, parked ones too
        (the next request re-evaluates its prompt). A busy model gives nothing: its
        context is in use."""
        worker = self._worker
        if worker is None or worker.busy:
            return 0
        batcher = self._batcher

        def drop() -> int:   # on the worker: a request may have come while this waited
            if worker.num_waiting or (batcher is not None and batcher.has_work):
                return 0
            self._prompt_cache.clear()   # host memory: not counted in what the context gives back
            return self._free_contexts()
        return self._on_worker(drop, 0)

    def relieve_host(self) -> int:
        """The host is short of memory: the conversations parked in host memory go (the next
        turn re-reads its prompt), and a paused context's sequences go to files under
        kv_disk_dir (read back at resume: engines/llamacpp/state.py)."""
        return self._on_worker(self._relieve_host_on_worker, 0)

    def _relieve_host_on_worker(self) -> int:
        freed = self._prompt_cache.clear()
        if self._paused is not None and self.config.kv_disk_dir:
            self._paused, spilled = spill(self._paused, Path(self.config.kv_disk_dir) / "spill")
            freed += spilled
        return freed

    def pause(self) -> int:
        return self._on_worker(self._pause_on_worker, 0)

    def _pause_on_worker(self) -> int:
        if self._session is None:
            return 0
        freed = self._held_kv_bytes()
        self._paused = pause_session(self._session)
        self._session = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self._state = ModelState.PAUSED
        return freed

    def resume(self) -> None:
        self._on_worker(self._ready_session, None)

    @property
    def busy(self) -> bool:
        worker = self._worker
        return worker.busy if worker is not None else False

    @property
    def idle_since(self) -> float:
        worker = self._worker
        return worker.idle_since if worker is not None else self._idle_since

    # --- for tests and benchmarks ----------------------------------------------------
    @contextlib.contextmanager
    def admitted_together(self) -> Iterator[None]:
        """Requests submitted inside the block join the batch in one step (the worker
        waits for the block to end): identical batches, so sampled outputs compare."""
        self.load()
        gate = threading.Event()
        assert self._worker is not None
        done = self._worker.submit(gate.wait, is_request=False)
        try:
            yield
        finally:
            gate.set()
            done.result()

    @property
    def num_running(self) -> int:
        """Requests holding a slot (reading their prompt or generating)."""
        batcher = self._batcher
        return batcher.num_running if batcher is not None else 0

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        batcher = self._batcher
        return batcher.num_waiting if batcher is not None else 0

    @property
    def num_evaluated(self) -> int:
        """Tokens the current context has decoded since it was made or restored."""
        session = self._session
        return session.num_evaluated if session is not None else 0
