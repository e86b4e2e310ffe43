"""The Triton decode-attention kernel on the CPU through Triton's interpreter
(TRITON_INTERPRET=1), against its torch reference, on every family's attention:
head dims 64, 96 (Phi-3: not a power of two), 256 (Gemma); query scale,
Gemma 2's soft-cap, sliding windows shorter than the history, partial RoPE
(Phi-4-mini). The same check runs on the GPU at load (Runner) and in tests/gpu.
Skipped where Triton is not installed (the CPU build of torch ships without it).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels.decode_attention import self_check  # noqa: E402
from engines.torch.model.attention import AttnSpec  # noqa: E402

SPECS = {
    "plain": AttnSpec(),
    "gemma2": AttnSpec(scale=0.07, softcap=1.5, window=40),
    "gemma3-local": AttnSpec(window=100),
    "phi4-partial-rope": AttnSpec(rope_dim=48),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("split", [False, True], ids=["one-program", "pieces"])
@pytest.mark.parametrize("num_heads,num_kv,head_dim", [(4, 2, 64), (4, 1, 96), (2, 1, 256)])
def test_kernel_matches_reference_on_every_family_attention(num_heads, num_kv, head_dim, split):
    """split: each history in pieces of 128 keys (flash decoding: 130 keys are two pieces, the
    repeated row's too), merged by the last program of a row and KV head."""
    specs = tuple(s for s in SPECS.values() if s.rope_dim < head_dim)
    assert self_check(torch.device("cpu"), torch.float32, num_heads, num_kv, head_dim, specs, split)


@pytest.mark.timeout(600)
def test_a_slot_store_in_pieces_attends_as_the_torch_ops_do():
    """SlotKV.use_pieces: the batch decode path hands the kernel its pieces (histories of 300
    keys in pieces of 128: three programs a row and KV head) and answers as the torch ops."""
    from engines.torch.model.attention import causal_mask
    from engines.torch.serve.kv_access import SlotKV, StaticStore, kv_layout

    torch.manual_seed(0)
    layout = kv_layout(1, 2, 64, torch.float32, 2, 320, 64 << 10)
    store = StaticStore(layout, torch.float32, torch.device("cpu"))
    k_hist, v_hist = store.views(0)
    k_hist.normal_()
    v_hist.normal_()
    kv = SlotKV(store)
    kv.use_pieces(128)
    assert kv.pieces.count == 3 and tuple(kv.pieces.counters.shape) == (2, 2)
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
    positions, slots = torch.tensor([[299], [40]]), torch.tensor([1, 0])
    kv.use_triton = False
    want = kv.attend_batch(0, q, k, v, positions, slots, causal_mask(positions, 320))
    kv.use_triton = True
    got = kv.attend_batch(0, q, k, v, positions, slots, causal_mask(positions, 320))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not kv.pieces.counters.any()
