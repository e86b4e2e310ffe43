"""TorchEngine: a Llama-family model served with its KV cache in kvcached virtual tensors.

Loads a GGUF file, a safetensors folder, or random weights from a named config
(ModelInfo.source "synthetic": benchmarks); builds the KV cache over the kvcached
page pool it is handed (one virtual tensor, pages mapped as sequences grow; the
daemon hands every engine its one pool, whose backend decided the device), and
runs a ServingLoop
(continuous batching, chunked prefill, prefix reuse, CUDA-graph decode). On
CUDA, load() compiles and captures every decode bucket ("compiling"), so no
request waits for it. The broker's verbs run between steps (the loop's
between_steps(), which lets them in at the next step boundary). Once the
broker hands it a client handle (attach_broker), a sequence runs only when the
KV it may need fits the broker's budget (engines/torch/serve/kv_budget.py).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator

import torch

from engines.base import Engine, ModelInfo, ProgressCallback
from engines.config import EngineConfig
from engines.context import served_context
from engines.phases import LoadPhases
from engines.errors import ContextOverflow, EmbeddingsUnsupported, InvalidRequest, ModelLoadError
from engines.torch.embedding import pooled_embedding
from engines.torch.serve.kv_access import KvcachedStore
from engines.torch.serve.kv_budget import KVBudget
from engines.torch.serve.oom import as_temporary
from engines.torch.serve import kv_persist
from engines.torch.serve.prefix_cache import PrefixCache
from engines.torch.serve.runner import Runner
from engines.torch.serve.scheduler import Scheduler, Sequence
from engines.torch.serve.serving import Job, ServingLoop
from engines.torch.serve.text_side import TextSide
from engines.torch.memory_verbs import MemoryVerbs
from engines.torch.source import read_model, weights_estimate
from engines.torch.weights_rung import WeightsRung
from engines.types import EmbeddingResult, GenerateRequest, LoadProgress, ModelState, StreamChunk
from kvcached.config import MiB
from kvcached.errors import ConfigError
from kvcached.page_pool import PagePool
from kvcached.vmm import device_sync

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MIN_KV_PAGES = 1   # a budget below one page could never run a sequence: refused at load


class TorchEngine(MemoryVerbs, Engine):
    kind = "torch"

    def __init__(self, info: ModelInfo, config: EngineConfig | None, kv_pool: PagePool) -> None:
        """kv_pool: the kvcached PagePool its KV pages come from. The daemon passes its one
        pool (the broker's); tests and benchmarks pass kvcached.standalone.standalone_pool().
        The pool's backend decides the device: weights and KV live where its pages do."""
        super().__init__(info)
        self.config = config or EngineConfig()
        if self.config.torch_dtype not in ("auto", *DTYPES):
            raise ConfigError(f"torch_dtype: {self.config.torch_dtype!r} is not one of auto, {', '.join(DTYPES)}")
        for key in ("torch_max_context", "torch_prefill_chunk"):
            if getattr(self.config, key) is not None and getattr(self.config, key) < 2:
                raise ConfigError(f"{key}: {getattr(self.config, key)} must be >= 2")
        self.kv_pool = kv_pool
        self.device: torch.device = kv_pool.backend.device
        self._lock = threading.RLock()          # load/unload/pause against each other
        self._state = ModelState.UNLOADED
        self.model: torch.nn.Module | None = None
        self.text: TextSide | None = None
        self.store: KvcachedStore | None = None
        self.loop: ServingLoop | None = None
        self.runner: Runner | None = None
        self.max_ctx = 0
        self.budget: KVBudget | None = None
        self.weights: WeightsRung | None = None   # the weights in pool pages (weights_to_host)
        self._broker_handle = None    # kvcached.broker.ClientHandle, set by attach_broker

    # --- lifecycle -------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        with self._lock:
            if self._state is not ModelState.UNLOADED:
                return
            self._state = ModelState.LOADING
            try:
                self._load(progress)
            except BaseException as exc:
                self._state = ModelState.UNLOADED
                self._drop()      # everything the failed load took goes back
                typed = as_temporary(exc, f"loading {self.info.name}")
                if typed is exc:
                    raise
                raise typed from exc
            self._state = ModelState.LOADED

    def _load(self, progress: ProgressCallback | None) -> None:
        report = (lambda f, stage: progress(LoadProgress(self.info.name, f, stage))) if progress else \
            (lambda f, stage: None)
        device = self.device
        self._check_pool()
        dtype = DTYPES.get(self.config.torch_dtype)
        phases = LoadPhases()
        self.load_phases = phases.seconds     # filled as the load goes: /api/ps shows a load in progress too
        with phases.phase("read"):
            self.model, self.text = read_model(self.info, device, dtype, lambda f: report(0.9 * f, "reading"),
                                               self.config.torch_llamacpp_numerics)
        cfg = self.model.cfg
        wanted = self.config.context_overrides.get(self.info.name, self.config.torch_max_context)
        if wanted is None:   # the trained length, bounded (engines/context.py)
            wanted = served_context(cfg.max_context, self.config.max_context,
                                    cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2, self.config.kv_budget_bytes)
        self.max_ctx = min(wanted, cfg.max_context)
        self.model.fit_context(self.max_ctx)    # LongRoPE (Phi-3) picks its factors by the context served
        report(0.92, "allocating")
        with phases.phase("kv"):
            self.store = KvcachedStore.over(self.kv_pool, self.model, self.config.torch_num_slots, self.max_ctx)
        num_slots = self.store.layout.max_slots
        scheduler = Scheduler(PrefixCache(num_slots, can_resume_at=self.store.can_resume_at), self.max_ctx, self.config.torch_prefill_chunk,
                              self.config.max_queue)
        with phases.phase("runner"):
            runner = self.runner = Runner(self.model, self.store,
                                          use_graphs=device.type == "cuda" and self.config.torch_cuda_graphs,
                                          compile=None if self.config.torch_compile else False)
            runner.phase_seconds = phases.seconds   # the idle compile and captures report there too
        if runner.attention_check_s:   # the Triton attention's check on this device, inside "runner"
            phases.seconds["attention_check"] = runner.attention_check_s
        if self._weights_movable():
            # After the runner fused its projections, before anything is compiled or captured:
            # kernels and graphs see the addresses the weights keep while they are away.
            with phases.phase("weights_to_pages"):
                self.weights = WeightsRung(self.model, self.kv_pool)
        if runner.use_graphs or runner.is_compiled:
            # Capture the first bucket here (compiled: batch 1's eager graph, no compile), not
            # in the middle of serving; the serving loop compiles and captures the rest while
            # idle (runner.warm_up says why).
            report(0.93, "compiling")
            with phases.phase("compile_capture"):
                runner.warm_up(lambda f: report(0.93 + 0.06 * f, "compiling"),
                               prefill_tokens=self.config.torch_prefill_chunk, first=1)
        # After the warm-up, which writes slot 0: restored conversations must stay as saved.
        self._keep_conversations(lambda tier, ident: kv_persist.restore(
            self.store, scheduler.prefix_cache, tier, ident))
        self.budget = self._make_budget()
        self.loop = ServingLoop(scheduler, runner, self.budget, self.config.max_queue,
                                before_step=self._resume_if_paused, name=self.info.name,
                                on_memory_error=self._give_back_failed)
        if self.weights is not None and device.type == "cuda":
            self.loop.when_quiet(self.weights.prepare_ahead)   # not on the first request's path
        if self.text is not None:
            self.loop.when_quiet(self.text.tokenizer.prepare)
        report(1.0, "ready")

    def _weights_movable(self) -> bool:
        wanted = self.config.torch_weights_to_host
        return self.device.type == "cuda" if wanted is None else wanted

    def _keep_conversations(self, act) -> None:
        kv_persist.where_kept(self.config, self.info, act, lambda path: kv_persist.identity(path, self.store))

    def _make_budget(self) -> KVBudget:
        """The KV budget over kvcached pages (engines/torch/serve/kv_budget.py)."""
        store = self.store
        weights = self.weights
        budget = KVBudget(self.info.name, store, self.config.admission_timeout_s,
                          drop_own=self.drop_prefixes, ensure_ahead=KvcachedStore.ENSURE_AHEAD,
                          away_bytes=(lambda: weights.host_bytes) if weights is not None else None,
                          step_tokens=self.config.torch_prefill_chunk)
        budget.handle = self._broker_handle
        store.trim()                # a warm-up's released pages: not counted against the budget
        budget.after_reclaim()
        return budget

    def attach_broker(self, handle: object | None) -> None:
        """Admit sequences through this broker client handle from now on (None: stop)."""
        self._broker_handle = handle
        if self.budget is not None:
            self.budget.handle = handle

    def load_estimate(self) -> int:
        return weights_estimate(self.info, self.device, DTYPES.get(self.config.torch_dtype))

    def _check_pool(self) -> None:
        """A pool whose budget holds not one page would fail every request: refuse the load
        (the factory then hands a GGUF file to llama.cpp, which takes no pages)."""
        pool = self.kv_pool
        if pool.budget() < MIN_KV_PAGES * pool.page_size:
            raise ModelLoadError(f"kvcached's budget of {pool.budget()} bytes holds no KV page of "
                                 f"{pool.page_size} bytes")

    def unload(self) -> int:
        with self._lock:
            if self._state is ModelState.UNLOADED:
                return 0
            freed = self.memory().total_bytes
            self._drop()
            self._state = ModelState.UNLOADED
            return freed

    def _drop(self) -> None:
        """Give back everything the model took (after a load, or a load that failed
        halfway): the worker, the runner's graphs, compiled step and weights
        (Runner.close says what each held), the KV pages, then the allocator's cache."""
        if self.loop is not None:
            self.loop.close()   # waits for the step in flight; fails what still waits
            self._keep_conversations(lambda tier, ident: kv_persist.save(
                self.store, self.loop.scheduler.prefix_cache, tier, ident))
        if self.runner is not None:
            self.runner.close()   # the model to the meta device: nothing reads the weights' pages
        if self.weights is not None:
            self.weights.close()
        if self.store is not None:
            self.store.close()
        self.loop = self.runner = self.store = self.model = self.text = self.budget = self.weights = None
        gc.collect()
        if self.device.type == "cuda":
            device_sync.empty_cache()
            # What the process still holds besides the context and kernel code (issue 15:
            # the residue after an unload is attributed from this line and NVML's figure).
            log.info("%s unloaded: allocator holds %.0f MiB, page pool %.0f MiB", self.info.name,
                     torch.cuda.memory_reserved(self.device) / MiB,
                     self.kv_pool.reserved() / MiB)

    @property
    def state(self) -> ModelState:
        return self._state

    # --- serving -----------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        """Checks and queues at once (errors raise here), then streams."""
        self.load()
        text = self._need_text()
        prompt = text.prompt_ids(request)
        n_ctx = min(request.num_ctx or self.max_ctx, self.max_ctx)   # a num_ctx above ours: what we hold
        if len(prompt) >= n_ctx:
            raise ContextOverflow(f"the prompt has {len(prompt)} tokens; this model's context here "
                                  f"holds {n_ctx} and one more is needed to answer")
        params = request.sampling
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(text.eog_ids))
        max_tokens = min(params.max_tokens, n_ctx - len(prompt))
        seq = Sequence(prompt, max_tokens, open_ended=params.open_ended)
        job = Job(request, seq, text.decoder(), frozenset(stop_ids),
                  guide=self._guide(request, text), token_text=lambda t: text.token_text(t))
        self.loop.submit(job)
        return self._stream(job)

    def _guide(self, request: GenerateRequest, text: TextSide):
        if request.constraint is None:
            return None
        from engines.torch.serve.guide import Guide, GuideTokenizer

        if text.guide_tokenizer is None:
            text.guide_tokenizer = GuideTokenizer(text.tokenizer, text.eog_ids, self.model.cfg.vocab_size)
        return Guide(text.guide_tokenizer, request.constraint)

    @staticmethod
    def _stream(job: Job) -> Iterator[StreamChunk]:
        finished = False
        try:
            while True:
                item = job.out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:   # the caller went away: free the slot now
                job.request.cancel()

    def embed(self, texts: list[str], truncate: bool = False) -> EmbeddingResult:
        """The last hidden state pooled as the GGUF declares (mean where it declares none:
        CLS takes the first token, last the last), L2-normalized."""
        self.load()
        text = self._need_text()
        vectors, total = [], 0
        for item in texts:
            ids = text.tokenize(item, add_special=True)
            if not ids:
                raise InvalidRequest("cannot embed an empty text")
            if len(ids) > self.max_ctx and truncate:
                ids = ids[:self.max_ctx]
            if len(ids) > self.max_ctx:
                raise ContextOverflow(f"a text to embed has {len(ids)} tokens; the context holds {self.max_ctx}")
            total += len(ids)
            with self.loop.between_steps():
                self._weights_back()
                vectors.append(tuple(pooled_embedding(self.model, ids, text.pooling).tolist()))
        return EmbeddingResult(tuple(vectors), total)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        self.load()
        return self._need_text().tokenize(text, add_special)

    def detokenize(self, token_ids: list[int]) -> str:
        self.load()
        return self._need_text().detokenize(token_ids)

    def _need_text(self) -> TextSide:
        if self.text is None:
            raise EmbeddingsUnsupported(f"model {self.info.name} has no tokenizer (random weights): "
                                        "it serves benchmarks only")
        return self.text

    @property
    def busy(self) -> bool:
        return self.loop is not None and self.loop.busy

    def finish_background_work(self, timeout_s: float) -> bool:
        """Until the serving loop has compiled and captured every decode bucket the load left
        pending (it does while idle, at once once asked here), or timeout_s passed."""
        runner, loop = self.runner, self.loop
        if loop is not None:
            loop.hurry()
        deadline = time.monotonic() + timeout_s
        while runner is not None and runner.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return runner is None or not runner.pending

    def stalled_s(self) -> float | None:
        loop = self.loop
        return None if loop is None else loop.stalled_s()

    @property
    def idle_since(self) -> float:
        if self.loop is None:
            return time.monotonic()
        return time.monotonic() if self.loop.busy else self.loop.idle_since
