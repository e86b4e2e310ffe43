"""One engine step on the model: prefill chunks, then one batched decode.

`Runner.run(plan)` returns the logits of every sequence that samples this step,
in `plan.sampling_sequences()` order. Prefill runs eagerly, one chunk per
sequence (its length varies). Decode on CUDA replays a CUDA graph captured per
(batch bucket, read-length bucket): at 135M parameters a step is ~0.1 ms of
memory traffic against several ms of Python launching 30 layers, so only a
graph reaches the 1,000 tok/s goal. `warm_up()` (called by the engine's load)
compiles and captures every bucket before the first request. Graphs live on this object (never module
globals) and stay valid across trim, pause and resume because the KV's virtual
addresses never move; the only inputs are fixed-address buffers (tokens,
positions, slots) and nothing in them syncs with the host.

Padding a batch up to its bucket repeats row 0 (same token, position and slot):
the repeated rows write identical K/V to the same place, so nothing else is
touched, and the read-length bucket only adds masked zeros.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
import weakref
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines.torch.cuda_libraries import process_stream, release_library_blocks
from engines.torch.kernels import decode_attention
from engines.torch.kernels.quant_ops import repeated_rows
from engines.torch.serve import batch_one
from engines.torch.serve.graph_capture import capturing, one_compile_at_a_time
from engines.torch.serve.kv_access import _ACTIVE as _ACTIVE_KV
from engines.torch.serve.kv_access import KVStore, SlotKV
from engines.torch.serve.scheduler import PrefillChunk, Sequence, StepPlan
from engines.torch.serve.step_inputs import StepInputs
from kvcached.vmm import device_sync

log = logging.getLogger(__name__)

MIN_READ_BUCKET = 256
# Runners on CUDA that are not closed: cuBLAS's workspaces are shared by every model of the
# process (its graphs may have captured one), so they are cleared only when none is left.
_OPEN_CUDA_RUNNERS: weakref.WeakSet = weakref.WeakSet()
# Attention backends for the eager paths (prefill, CPU decode). Not cuDNN: it builds an
# execution plan for every new (query length, key length), ~0.3-1.3 s each on the H100,
# and prompts come in every length: under 32 users of llama-3.2-1b a step with a prefill
# took 0.35-1.5 s (measured, colocate_diag), against milliseconds with flash/efficient.
EAGER_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n (buckets sorted ascending, the last one >= any n)."""
    return next(b for b in buckets if b >= n)


def pow2_buckets(first: int, last: int) -> list[int]:
    out, b = [], first
    while b < last:
        out.append(b)
        b *= 2
    return out + [last]


class DecodeGraph:
    """One captured decode step over fixed buffers: B rows, attention over read_len tokens."""

    def __init__(self, runner: Runner, batch: int, read_len: int,
                 tokens: list[int], positions: list[int], slots: list[int], repeated: bool = False) -> None:
        """repeated: one request in a graph of two rows, captured under quant_ops.repeated_rows
        (each quantized projection computes row 0 alone: batch_one.py)."""
        device = runner.device
        self.runner = runner
        self.repeated = repeated
        self.inputs = StepInputs(batch, device)        # step_inputs.py: how tokens reach the graph
        self.key_index = torch.arange(read_len, device=device)
        self.forward = runner.forward_for(batch)
        if runner.compiles(batch):
            # One compiled step for every bucket: batch and read length are sizes, not constants.
            for t in (self.inputs.ids, self.inputs.pos, self.inputs.slots, self.key_index):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        # Warm up on the real inputs of this step: a warm-up writes K/V, and only the
        # step's own positions are mapped and free to overwrite (with the same values).
        # The warm-up also compiles, where torch.compile is on.
        self.inputs.load(tokens, positions, slots)
        with one_compile_at_a_time(runner.compiles(batch)):
            side = runner.side_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.inputs.mark_read()                  # the warm-ups' reads come before the next load
            self.graph = torch.cuda.CUDAGraph()
            with capturing(self.graph, runner.graph_pool, device):         # graph_capture.py: other models go on
                self.logits = self._forward()                               # [B, 1, V]

    def close(self) -> None:
        """The graph's executable and its buffers go (see Runner.close)."""
        self.graph.reset()
        self.inputs.close()
        self.key_index = self.logits = None

    def _forward(self) -> torch.Tensor:
        self.inputs.take()
        self.runner.kv.bind_batch(self.inputs.slots, self.key_index)
        with repeated_rows() if self.repeated else contextlib.nullcontext():
            return self.forward(self.inputs.ids, self.inputs.pos)

    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        self.inputs.load(tokens, positions, slots)
        self.graph.replay()
        self.inputs.mark_read()
        return self.logits[:len(tokens), 0]                             # [n, V]


class Runner:
    def __init__(self, model: torch.nn.Module, store: KVStore, use_graphs: bool | None = None,
                 compile: bool | None = None, triton: bool | None = None) -> None:
        """use_graphs, compile, triton: None means on where the model is on CUDA
        (triton: the one-kernel decode attention, after it checks out here)."""
        if model.device.type == "cuda":
            # One GEMM for q/k/v and one for gate/up: 7 -> 4 kernels a layer, ~3.4 us each
            # for SmolLM2-135M in a graph on the H100 (decode_profile.json).
            model.fuse_projections()
        self.model = model
        self.store = store
        self.kv = SlotKV(store)
        self.attention_check_s = 0.0
        self.device = model.device
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        # Eager, a decode step is ~40 small kernels a layer (norms, RoPE, SiLU in
        # float32 pieces); compiled, Inductor fuses the model's own ops. Measured on
        # the H100 with attention still as torch ops: 1.96 ms a step for SmolLM2-135M,
        # ~65 us a layer beyond weight reads, hence the Triton attention kernel.
        # Graphs capture the compiled step; Inductor's own cudagraphs are off.
        self.is_compiled = on_cuda if compile is None else compile
        cfg = model.cfg
        if (on_cuda if triton is None else triton) and decode_attention.is_available(self.device):
            # Checked on every attention the model's layers ask for (windows, soft-caps, partial RoPE).
            specs = tuple(dict.fromkeys(layer.self_attn.spec for layer in model.model.layers))
            started = time.monotonic()
            self.kv.use_triton = decode_attention.self_check(
                self.device, model.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, specs)
            self.attention_check_s = time.monotonic() - started   # part of the load's "runner" phase
        store.set_tail_reads(not self.kv.use_triton)
        self.decode_forward = self._decode_forward
        if self.is_compiled:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            self.decode_forward = torch.compile(self._decode_forward)
        layout = store.layout
        self.max_ctx = layout.max_context
        # Compiled, batch 1 runs as 2: Dynamo specializes size-1 dimensions, so a bucket
        # of 1 would compile the whole model a second time. batch_one.py adds a batch-1 graph
        # of its own (eager, or the compiled step computing its one row) where that is faster.
        self.batch_buckets = pow2_buckets(2 if self.is_compiled and layout.max_slots > 1 else 1,
                                          layout.max_slots)
        # The Triton kernel reads each row's own length on the device: one bucket does.
        self.read_buckets = [self.max_ctx] if self.kv.use_triton else \
            pow2_buckets(min(MIN_READ_BUCKET, self.max_ctx), self.max_ctx)
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.pending: list[tuple[int, int]] = []   # buckets warm_up left for capture_pending
        self.batch_one_undecided = False           # batch_one.eager_first until decide
        self.batch_one_kind = "eager"              # compiled, batch 1's graphs: "eager" or "repeated"
        self.phase_seconds: dict[str, float] = {}  # the engine's load phases: idle captures add theirs
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.side_stream = process_stream(self.device, "capture warm-up") if self.use_graphs else None
        if on_cuda:
            _OPEN_CUDA_RUNNERS.add(self)

    def new_graph(self, batch: int, read_len: int, tokens: list[int], positions: list[int],
                  slots: list[int]) -> DecodeGraph:
        """A decode graph of this bucket; batch 1 of a compiled model as batch_one chose it."""
        if batch == 1 and self.batch_one_kind == "repeated":
            return DecodeGraph(self, 2, read_len, tokens, positions, slots, repeated=True)
        return DecodeGraph(self, batch, read_len, tokens, positions, slots)

    def forward_for(self, batch: int) -> Callable:
        """The step a graph of this batch captures: compiled, except batch 1 of a compiled
        model, which is captured eager (batch_one.py: only where that replays faster)."""
        return self._decode_forward if self.is_compiled and batch == 1 else self.decode_forward

    def compiles(self, batch: int) -> bool:
        """Whether a graph of this batch captures the compiled step (graph_capture's compile turn)."""
        return self.is_compiled and self.forward_for(batch) is self.decode_forward

    def warm_keys(self) -> list[tuple[int, int]]:
        """Every (batch bucket, read bucket) a decode step can need."""
        return [(b, r) for b in self.batch_buckets for r in self.read_buckets]

    @torch.inference_mode()
    def warm_up(self, progress: Callable[[float], None] = lambda f: None, prefill_tokens: int = 0,
                first: int | None = None) -> None:
        """Compile and capture decode buckets now (at load), not on the first
        steps of serving: on the H100 the first decode of a synthetic Llama-3.1-8B
        compiled for ~56 s and each later bucket captured in ~1 s, all under the
        serving loop's step lock, so requests waited 20-50 s for a first token and a
        broker trim waited 41 s for the lock while another app's allocation failed.
        `first`: capture only that many buckets now (the compile happens with the
        first: one compiled step serves every bucket); the rest wait in `pending`
        for `capture_pending()`, which the serving loop calls when it is idle, so a
        cold model's first request waits for one graph, not all of them. Compiled,
        that one graph is batch 1's, eager (batch_one.eager_first): the first request
        waits for no compile at all; the idle loop compiles with the first compiled
        bucket (under the step lock: a broker verb on this model waits for it, as it
        waited for the load before).
        Runs on slot 0, position 0 (mapped for it, released after): padding repeats
        that row, and reads past it see unmapped pages, which read zeros. A no-op
        where nothing is compiled or captured (the CPU)."""
        if not (self.use_graphs or self.is_compiled):
            return
        keys = self.warm_keys() if self.use_graphs else [(b, 0) for b in self.batch_buckets]
        now, self.pending = (keys, []) if first is None else (keys[:first], keys[first:])
        prefill_tokens = min(prefill_tokens, self.max_ctx - 1)
        self.store.ensure(0, max(1, prefill_tokens), start=0)
        try:
            with self.store.step_guard():
                if prefill_tokens > 1:
                    started = time.monotonic()
                    self._warm_prefill(prefill_tokens)
                    self.phase_seconds["prefill_warm_up"] = time.monotonic() - started   # in compile_capture
                if first is not None and batch_one.eager_first(self, slot=0):
                    progress(1.0)   # compiled: batch 1 eager now, the compile while idle
                else:
                    for i, key in enumerate(now):
                        self._capture(key, slot=0)
                        progress((i + 1) / len(now))
                    batch_one.choose(self, slot=0)
                    while first is None and self.pending:   # batch 1's other read lengths
                        self._capture(self.pending.pop(0), slot=0)
            if self.device.type == "cuda":
                device_sync.synchronize_device(self.device)
        finally:
            self.store.release(0)

    @torch.inference_mode()
    def capture_pending(self, slot: int) -> bool:
        """Capture the next bucket warm_up left pending, on `slot`, which must hold no
        tokens anyone needs (its position 0 is written, then released). False when
        none is pending. The caller holds the step lock: this is a step of its own."""
        if not self.pending:
            return False
        key = self.pending.pop(0)
        started = time.monotonic()
        self.store.ensure(slot, 1, start=0)
        try:
            with self.store.step_guard():
                self._capture(key, slot)
                batch_one.decide(self, slot)   # after the first compiled bucket (eager_first)
        finally:
            self.store.release(slot)
        # Where the load's phases are reported (/api/ps): the compile moved here (issue 22).
        phases = self.phase_seconds
        phases["capture_while_idle"] = phases.get("capture_while_idle", 0.0) + time.monotonic() - started
        return True

    def _capture(self, key: tuple[int, int], slot: int) -> None:
        batch, read_len = key
        if not self.use_graphs:
            self._decode_eager([0] * batch, [0] * batch, [slot] * batch)   # compiles
        elif key not in self.graphs:
            log.info("capturing decode graph: batch %d, read length %d", batch, read_len)
            self.graphs[key] = self.new_graph(batch, read_len, [0], [0], [slot])

    def _warm_prefill(self, n: int) -> None:
        """One prefill chunk of the largest size: the caching allocator keeps its blocks, so
        the first prompts of a burst do not each wait on cudaMalloc, which synchronizes
        with the GPU (measured: three llama-3.2-1b on the H100, steps with a prefill took
        0.3-0.8 s for the first ~10 s of a model's first burst, then ~40 ms)."""
        seq = Sequence(prompt=[0] * n, max_tokens=1, slot=0)
        self.prefill(PrefillChunk(seq, 0, n))

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(ids, positions, self.kv)                     # [B, 1, V]

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [N, V] (float32) of plan.sampling_sequences(), in that order."""
        with self.store.step_guard():
            rows = [self.prefill(chunk) for chunk in plan.prefills]
            rows = [r for r in rows if r is not None]
            if plan.decodes:
                rows.append(self.decode(list(plan.decodes)))
        if not rows:   # only prompt chunks that are not a prompt's last: nothing samples
            return torch.empty((0, self.model.cfg.vocab_size), device=self.device)
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        """Compute a prompt chunk's KV; the last chunk's final logits [1, V], else None."""
        seq, n = chunk.seq, chunk.end - chunk.start
        self.store.ensure(seq.slot, chunk.end, start=chunk.start)
        ids = torch.tensor([seq.prompt[chunk.start:chunk.end]], dtype=torch.long, device=self.device)
        positions = torch.arange(chunk.start, chunk.end, device=self.device).unsqueeze(0)   # [1, n]
        self.kv.bind_slot(seq.slot, chunk.end)
        last = torch.tensor([n - 1], device=self.device)
        with sdpa_kernel(EAGER_SDPA):
            logits = self.model(ids, positions, self.kv, logit_index=last)               # [1, 1, V]
        return logits[:, 0] if chunk.is_last else None

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence: feeds its last token at position num_computed. [B, V]"""
        tokens = [s.output[-1] for s in seqs]
        positions = [s.num_computed for s in seqs]
        slots = [s.slot for s in seqs]
        for slot, pos in zip(slots, positions):
            self.store.ensure(slot, pos + 1, start=pos)
        if self.use_graphs:
            return self._decode_graphed(tokens, positions, slots)
        return self._decode_eager(tokens, positions, slots)

    def _decode_eager(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)    # [B, 1]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1)
        if len(slots) == 1:
            # One row whose position is the last readable key: no mask, SDPA's fastest path.
            self.kv.bind_slot(slots[0], positions[0] + 1, needs_mask=False)
        else:
            self.kv.bind_batch(torch.tensor(slots, device=self.device), max(positions) + 1)
        with sdpa_kernel(EAGER_SDPA):
            return self.decode_forward(ids, pos)[:, 0]

    def close(self) -> None:
        """Give back everything this runner holds on the device (issue 15: an unload on
        the H200 gave back 24 MiB of ~1.4 GiB, and reloads grew the process). Held:
        - the decode graphs: each CUDAGraph's executable and its static inputs, pinned
          staging and logits, all allocated in `graph_pool`, a private pool of the
          caching allocator that only comes back once every graph using it is reset
          and the pool handle dropped;
        - the compiled step (`decode_forward`, torch.compile): a callable bound to this
          runner, so to the model; Dynamo's cache of it is per code object and shared
          with other runners, so it is not reset, only our reference dropped;
        - the model's tensors (weights, fused projections, RoPE tables): moved to the
          meta device, so whatever may still hold the module holds no memory;
        - SlotKV's views of the KV (the store itself is the engine's to close) and the
          thread's forward context;
        - cuBLAS's workspaces (one per handle and stream it ran on, the captures' side
          stream among them), which the caching allocator's empty_cache does not free:
          cleared when this was the last open runner on CUDA (another model's graphs may
          have captured one).
        Then gc (graphs and modules hold reference cycles) and, on CUDA, the caching
        allocator's free blocks go back to the driver. Idempotent."""
        for graph in self.graphs.values():
            graph.close()
        self.graphs.clear()
        self.pending = []
        self.graph_pool = self.side_stream = None
        self.decode_forward = None
        if getattr(_ACTIVE_KV, "kv", None) is self.kv:
            _ACTIVE_KV.kv = None
        self.kv = None
        if self.model is not None:
            try:
                self.model.to(device="meta")
            except Exception as exc:  # noqa: BLE001 - a module that cannot move is still dropped
                log.debug("moving the model to meta failed: %s", exc)
            self.model = None
        gc.collect()
        if self.device.type == "cuda":
            device_sync.synchronize_device(self.device)
            _OPEN_CUDA_RUNNERS.discard(self)
            # cuBLAS's workspaces outlive empty_cache (cuda_libraries.process_stream says why);
            # cleared only when no other runner is open (another model's graphs may have captured one).
            if _OPEN_CUDA_RUNNERS:
                device_sync.empty_cache()
            else:
                release_library_blocks()

    def _decode_graphed(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        key = (bucket(len(tokens), self.batch_buckets), bucket(max(positions) + 1, self.read_buckets))
        graph = self.graphs.get(key)
        if graph is None:
            log.info("capturing decode graph: batch %d, read length %d", *key)
            graph = self.graphs[key] = self.new_graph(key[0], key[1], tokens, positions, slots)
        return graph.run(tokens, positions, slots)
