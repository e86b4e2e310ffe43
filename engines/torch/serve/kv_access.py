"""The serving side's KV: where each slot's K and V live, and how a forward reaches them.

`KVStore` is what the runner needs of a KV cache: per layer, K and V over every
slot as fixed-address tensors [S, Hkv, max_ctx, D], and the verbs to make
tokens writable (`ensure`), forget a slot, trim, pause and resume.
`KvcachedStore` puts kvcached's virtual-tensor KVCache behind it (the engine's
KV in production); `StaticStore` is one preallocated tensor in the very same
layout, the baseline that measures what mapping on demand costs.

`SlotKV` is the model's `KVAccess` (engines.torch.model.attention) over a store:
batch row b is slot `slots[b]`. A single sequence (prefill, CPU decode) works
on its slot's views directly. A decode batch goes through one opaque custom op
(`ebbtide::slot_attend`, so torch.compile never sees the cache tensors): on
CUDA the one-kernel Triton decode attention (engines.torch.kernels.decode_attention),
elsewhere index_put_ + index_select + SDPA over a read-length bucket. Either
way a step has no host sync and is captured in a CUDA graph per bucket.
"""
from __future__ import annotations

import abc
import contextlib
import threading

import torch

from engines.torch.model.attention import (
    PLAIN,
    AttnSpec,
    KVAccess,
    cache_attention,
    causal_mask,
    rotate_qk,
    write_kv,
)
from engines.torch.kernels.decode_attention import Pieces, decode_attention
from kvcached.kv_cache.layout import KVLayout, KVShape


class KVStore(abc.ABC):
    layout: KVLayout

    @abc.abstractmethod
    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer over every slot, [S, Hkv, max_ctx, D], fixed addresses."""

    @abc.abstractmethod
    def ensure(self, slot: int, n_tokens: int, start: int | None = None) -> None:
        """Tokens [0, n_tokens) of the slot are writable and live (maps pages as needed).
        start: the first token this step writes (default: where the last step ended);
        sliding layers' keys it can no longer read may be given back."""

    def can_resume_at(self, slot: int, n_tokens: int) -> bool:
        """Whether a sequence may continue at token n_tokens with the slot's KV: false where
        sliding layers' keys it would read were given back (a prefix is then recomputed)."""
        return True

    @abc.abstractmethod
    def release(self, slot: int) -> None:
        """The slot holds nothing worth keeping: its pages may be given back."""

    def step_guard(self) -> contextlib.AbstractContextManager:
        """Held while a step reads or writes the KV: no page is unmapped meanwhile."""
        return contextlib.nullcontext()

    def trim(self) -> int:
        """Give back pages that hold no live token; returns bytes."""
        return 0

    def set_tail_reads(self, reads_tail: bool) -> None:
        """Whether this engine's kernels read slots past their live tokens (a decode over
        a read-length bucket does; the one-kernel Triton decode and prefill do not)."""

    def pause(self) -> int:
        """Move live KV to host memory and give back the pages; returns bytes."""
        return 0

    def resume(self) -> None:
        """Bring paused KV back where it was, bit-exact."""

    @abc.abstractmethod
    def live_tokens(self, slot: int) -> int:
        """Tokens of the slot whose K and V are kept (its live length)."""

    @property
    def held_bytes(self) -> int:
        return self.layout.total_bytes

    @property
    def live_bytes(self) -> int:
        return 0

    @property
    def paused_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """Give back everything."""


class StaticStore(KVStore):
    """One preallocated tensor in KVLayout's token-major layout; never maps or trims."""

    def __init__(self, layout: KVLayout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self._flat = torch.zeros(layout.total_elems, dtype=dtype, device=device)
        self._live = [0] * layout.max_slots

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self._view(self.layout.batched_view(layer, is_value)) for is_value in (False, True))

    def _view(self, spec) -> torch.Tensor:
        return self._flat.as_strided(spec.size, spec.stride, spec.offset)

    def ensure(self, slot: int, n_tokens: int, start: int | None = None) -> None:
        self.layout.check_tokens(n_tokens)
        self._live[slot] = n_tokens

    def release(self, slot: int) -> None:
        self._live[slot] = 0

    def live_tokens(self, slot: int) -> int:
        return self._live[slot]

    @property
    def live_bytes(self) -> int:
        return sum(self.layout.live_bytes_for(n) for n in self._live)

    def close(self) -> None:
        self._flat = torch.empty(0, dtype=self._flat.dtype, device=self._flat.device)


class KvcachedStore(KVStore):
    """kvcached's KVCache (virtual tensors, pages mapped as sequences grow).

    Every slot is acquired from the cache once, here: which slot a request
    runs in is the prefix cache's choice (engines.torch.serve.prefix_cache), and a
    finished sequence's slot must keep its tokens live so trim() leaves the
    reusable prefix alone. A slot's live length is what `ensure` last set."""

    # A growing slot is ensured this many tokens ahead: a decode step then calls into
    # the cache (its lock, its table) once in 16 tokens, not for every row of every
    # step, which cost ~8% of a batch-8 step of SmolLM2-135M on the H100. Live
    # bytes overstate by under 16 tokens a slot; pages are never taken early.
    ENSURE_AHEAD = 16

    def __init__(self, cache) -> None:  # kvcached.kv_cache.manager.KVCache
        self.cache = cache
        self.layout = cache.layout
        taken = sorted(cache.acquire_slot() for _ in range(self.layout.max_slots))
        assert taken == list(range(self.layout.max_slots))
        self._ensured = [0] * self.layout.max_slots   # the slot's live length in the cache
        self._asked = [0] * self.layout.max_slots     # what the runner last asked for

    @classmethod
    def over(cls, pool, model: torch.nn.Module, num_slots: int, max_ctx: int) -> "KvcachedStore":
        """The store of `model`'s KV over kvcached `pool` (a PagePool): `num_slots` slots of
        `max_ctx` tokens, in the dtype the model's numerics want (float16 on the
        llama.cpp-numerics path, as llama.cpp). Sliding-window layers get a part of their
        own, whose pages behind the window go back to the pool (kvcached/kv_cache/window.py)."""
        from engines.torch.ggml.numerics import kv_cache_dtype
        from kvcached.kv_cache.manager import KVCache

        cfg = model.cfg
        windows = tuple(cfg.window(i) for i in range(cfg.num_layers))
        shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_cache_dtype(model),
                        windows if any(windows) else ())
        return cls(KVCache(pool, shape, num_slots, max_ctx))

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.batched_kv(layer)

    def ensure(self, slot: int, n_tokens: int, start: int | None = None) -> None:
        asked, ensured = self._asked[slot], self._ensured[slot]
        # The cache's live length runs up to ENSURE_AHEAD past the tokens written: it is
        # told where the step really starts, or it would give back keys the step reads.
        start = min(asked, n_tokens) if start is None else start
        self._asked[slot] = n_tokens
        if start == asked < n_tokens <= ensured:
            return                              # growing inside what is already live
        if n_tokens > asked:
            n_tokens = min(-(-n_tokens // self.ENSURE_AHEAD) * self.ENSURE_AHEAD, self.layout.max_context)
        try:
            self.cache.ensure(slot, n_tokens, start)   # a shorter sequence sets exactly its length
        except BaseException:
            self._asked[slot] = asked           # the cache is unchanged: so are we
            raise
        self._ensured[slot] = n_tokens

    def release(self, slot: int) -> None:
        self.ensure(slot, 0)   # no live token: trim may take every page

    def live_tokens(self, slot: int) -> int:
        return self.cache.num_tokens(slot)

    def can_resume_at(self, slot: int, n_tokens: int) -> bool:
        return self.cache.can_resume_at(slot, n_tokens)

    def window_floor(self, slot: int) -> int:
        """The first token whose sliding layers' KV the slot still holds (0: all of them)."""
        return self.cache.window_floor(slot)

    def export_slot(self, slot: int, n_tokens: int) -> torch.Tensor:
        """A host copy of the slot's first n_tokens of KV (live or paused)."""
        return self.cache.export_slot(slot, n_tokens)

    def import_slot(self, slot: int, kv: torch.Tensor, window_floor: int = 0) -> None:
        """The slot holds exactly this KV's tokens (read back from the disk tier), its
        sliding layers' from window_floor (what export's slot held)."""
        self.cache.import_slot(slot, kv, window_floor)
        self._asked[slot] = self._ensured[slot] = kv.shape[0]

    def step_guard(self):
        return self.cache.step_guard()

    def set_tail_reads(self, reads_tail: bool) -> None:
        self.cache.tail_readers = reads_tail

    def trim(self) -> int:
        return self.cache.trim()

    def pause(self) -> int:
        return self.cache.pause()

    def resume(self) -> None:
        self.cache.resume()

    @property
    def held_bytes(self) -> int:
        return self.cache.held_bytes()

    @property
    def live_bytes(self) -> int:
        return self.cache.live_bytes()

    @property
    def paused_bytes(self) -> int:
        return self.cache.paused_host_bytes()

    def close(self) -> None:
        self.cache.close()


def kv_layout(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              num_slots: int, max_ctx: int, page_size: int) -> KVLayout:
    return KVLayout(KVShape(num_layers, num_kv_heads, head_dim, dtype), num_slots, max_ctx, page_size)


class SlotKV(KVAccess):
    """Batch row b of a forward is slot slots[b]. Call `bind_slot` or `bind_batch`
    before each forward (or once before capturing a graph)."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.refresh()
        self._slot: int | None = None
        self._slots: torch.Tensor | None = None
        self._read_len = 0
        self._needs_mask = True
        self._mask: torch.Tensor | None = None
        self.use_triton = False   # the runner turns the one-kernel decode attention on where it checks out
        self.pieces: Pieces | None = None   # flash decoding: histories split across programs (use_pieces)

    def use_pieces(self, tokens: int) -> None:
        """Split each decode history into pieces of `tokens` keys, one program each (flash
        decoding; decode_attention.Pieces), for every graph captured from now on."""
        layout = self.store.layout
        self.pieces = Pieces.for_cache(layout.max_context, layout.max_slots, layout.shape.num_kv_heads,
                                       self.k[0].device, tokens)

    def refresh(self) -> None:
        """Take the store's views again (after a store is rebuilt; addresses never move otherwise)."""
        views = [self.store.views(i) for i in range(self.store.layout.shape.num_layers)]
        self.k = [kv[0] for kv in views]
        self.v = [kv[1] for kv in views]

    def bind_slot(self, slot: int, read_len: int, needs_mask: bool = True) -> None:
        """One sequence in one slot; read_len = tokens visible after this forward's writes."""
        self._slot, self._slots, self._read_len, self._needs_mask = slot, None, read_len, needs_mask

    def bind_batch(self, slots: torch.Tensor, key_index: torch.Tensor | int) -> None:
        """A decode batch: slots [B] int64 on the model's device; key_index [R] (or the int R), any
        tensor whose length R (a bucket >= every position + 1) is the keys read.
        R comes from a tensor's shape, not a Python int, so torch.compile treats
        it as a size and does not recompile for every bucket."""
        self._slot, self._slots, self._read_len, self._needs_mask = None, slots, key_index, True
        # Set here, outside any compiled region: Dynamo would trace this side effect, not run it.
        _ACTIVE.kv = self

    def _keys_read(self) -> int:
        return self._read_len if isinstance(self._read_len, int) else self._read_len.shape[0]

    def begin(self, positions: torch.Tensor) -> None:
        self._mask = causal_mask(positions, self._keys_read()) if self._needs_mask else None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, spec: AttnSpec = PLAIN) -> torch.Tensor:
        if self._slot is not None:
            k_cache = self.k[layer][self._slot:self._slot + 1]          # [1, Hkv, max_ctx, D] view
            v_cache = self.v[layer][self._slot:self._slot + 1]
            write_kv(k_cache, v_cache, k, v, positions)
            return cache_attention(q, k_cache, v_cache, self._mask, self._read_len, spec, positions)
        if spec.attention is not None:   # a layer's own attention (llama.cpp's, CPU): never compiled
            return self.attend_batch(layer, q, k, v, positions, self._slots, self._mask, spec=spec)
        return self._attend_op(layer, q, k, v, positions, None, None, spec)

    def attend_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      spec: AttnSpec = PLAIN) -> torch.Tensor:
        if self._slot is not None:
            return super().attend_rotary(layer, q, k, v, positions, cos, sin, spec)
        return self._attend_op(layer, q, k, v, positions, cos, sin, spec)

    def _attend_op(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                   spec: AttnSpec) -> torch.Tensor:
        # Compiled, the batch path is one opaque op: the KV tensors stay out of the
        # traced graph. As graph inputs, 2 x layers views of one buffer that the graph
        # writes made AOTAutograd rebuild and copy back the whole buffer every step,
        # unmapped (read-only zero) pages included: an illegal-address crash on the H100.
        return torch.ops.ebbtide.slot_attend(q, k, v, positions, self._slots, self._mask, cos, sin, layer,
                                             spec.scale, spec.softcap, spec.window, spec.rope_dim)

    def attend_batch(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     spec: AttnSpec = PLAIN) -> torch.Tensor:
        """A decode batch; cos, sin given: q and k are still to be rotated."""
        if self.use_triton and q.shape[2] == 1:
            return decode_attention(q, k, v, positions, slots, self.k[layer], self.v[layer], cos, sin, spec,
                                    self.pieces)
        if cos is not None:
            q, k = rotate_qk(q, k, cos, sin, spec.rope_dim)
        read_len = mask.shape[-1]
        rows = slots.unsqueeze(1).expand_as(positions)                  # [B, T]
        # Advanced indices around a slice put their dims first: target [B, T, Hkv, D].
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v[layer].dtype)
        keys = self.k[layer][:, :, :read_len].index_select(0, slots)   # [B, Hkv, R, D]
        values = self.v[layer][:, :, :read_len].index_select(0, slots)
        return cache_attention(q, keys, values, mask, read_len, spec, positions).contiguous()


# The SlotKV whose forward runs on this thread (vLLM's "forward context"): the op
# below finds its KV here, so no tensor of the cache is an argument.
_ACTIVE = threading.local()


@torch.library.custom_op("ebbtide::slot_attend", mutates_args=())
def _slot_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 layer: int, scale: float, softcap: float, window: int, rope_dim: int) -> torch.Tensor:
    """Write k, v of a decode batch into its slots and attend: [B, Hq, T, D], contiguous.
    cos, sin: rotate q and k first (None: they are rotated already). scale, softcap,
    window, rope_dim: the layer's AttnSpec, spelled out (custom ops take plain values)."""
    spec = AttnSpec(scale, softcap, window, rope_dim)
    return _ACTIVE.kv.attend_batch(layer, q, k, v, positions, slots, mask, cos, sin, spec)


@_slot_attend.register_fake
def _slot_attend_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      layer: int, scale: float, softcap: float, window: int, rope_dim: int) -> torch.Tensor:
    return q.new_empty(q.shape)
