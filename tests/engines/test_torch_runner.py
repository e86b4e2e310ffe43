"""The runner on a small random model: chunked prefill, batched decode over slots
and the kvcached virtual-tensor KV all give the logits of one plain forward."""
from __future__ import annotations

import pytest
import torch

from engines.torch.model.attention import ContiguousKV
from engines.torch.model.configs import ModelConfig
from engines.torch.serve.kv_access import KvcachedStore, StaticStore, kv_layout
from engines.torch.serve.runner import Runner, bucket, pow2_buckets
from engines.torch.serve.scheduler import PrefillChunk, Sequence, StepPlan
from engines.torch.model.synthetic import synthetic_model
from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.vmm import open_backend

CFG = ModelConfig(vocab_size=97, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                  ffn_dim=64, max_context=64)
SLOTS, CTX = 4, 48
PAGE = 64 * 1024


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return synthetic_model(CFG, "cpu", torch.float32, seed=3)


def static_store():
    return StaticStore(kv_layout(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, torch.float32, SLOTS, CTX, PAGE),
                       torch.float32, torch.device("cpu"))


@pytest.fixture
def virtual_store():
    config = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0)
    cache = KVCache(open_backend(config), KVShape(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, torch.float32),
                    SLOTS, CTX, config)
    store = KvcachedStore(cache)
    yield store
    store.close()


@torch.inference_mode()
def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of every position, one forward over a plain cache."""
    kv = ContiguousKV(CFG.num_layers, 1, CFG.num_kv_heads, len(tokens), CFG.head_dim, torch.float32)
    return model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0), kv)[0]


def run_sequence(runner: Runner, seq: Sequence, chunk: int, new_tokens: list[int]) -> list[torch.Tensor]:
    """Prefill in chunks, then decode new_tokens one by one; logits of each sampling step."""
    out = []
    while seq.is_prefilling:
        end = min(seq.num_computed + chunk, len(seq.prompt))
        plan = StepPlan(prefills=(PrefillChunk(seq, seq.num_computed, end),))
        logits = runner.run(plan) if end == len(seq.prompt) else runner.prefill(plan.prefills[0])
        seq.num_computed = end
        if end == len(seq.prompt):
            out.append(logits[0])
    for token in new_tokens:
        seq.output.append(token)
        out.append(runner.run(StepPlan(decodes=(seq,)))[0])
        seq.num_computed += 1
    return out


@pytest.mark.parametrize("store_kind", ["static", "virtual"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_prefill_and_decode_match_one_forward(model, store_kind, chunk, request):
    store = static_store() if store_kind == "static" else request.getfixturevalue("virtual_store")
    runner = Runner(model, store)
    prompt, new = [5, 17, 3, 88, 41, 2, 9], [11, 60, 7]
    seq = Sequence(prompt=list(prompt), max_tokens=10, slot=2)
    got = torch.stack(run_sequence(runner, seq, chunk, new))
    want = reference_logits(model, prompt + new)[len(prompt) - 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_batched_decode_over_slots_matches_each_alone(model, virtual_store):
    runner = Runner(model, virtual_store)
    prompts = {0: [1, 2, 3], 3: [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 12], 1: [44]}
    seqs = [Sequence(prompt=p, max_tokens=8, slot=s) for s, p in prompts.items()]
    for seq in seqs:
        run_sequence(runner, seq, chunk=4, new_tokens=[])
        seq.output.append(30 + seq.slot)
    steps = [runner.run(StepPlan(decodes=tuple(seqs)))]
    for seq in seqs:
        seq.num_computed += 1
        seq.output.append(50 + seq.slot)
    steps.append(runner.run(StepPlan(decodes=tuple(seqs))))
    for i, seq in enumerate(seqs):
        want = reference_logits(model, seq.tokens)[-2:]
        torch.testing.assert_close(torch.stack([steps[0][i], steps[1][i]]), want, rtol=1e-4, atol=1e-4)


def test_mixed_step_returns_logits_in_sampling_order(model):
    runner = Runner(model, static_store())
    a = Sequence(prompt=[3, 4, 5], max_tokens=4, slot=0)
    run_sequence(runner, a, chunk=8, new_tokens=[])
    a.output.append(6)
    b = Sequence(prompt=[7, 8], max_tokens=4, slot=1)
    plan = StepPlan(prefills=(PrefillChunk(b, 0, 2),), decodes=(a,))
    logits = runner.run(plan)
    assert plan.sampling_sequences() == [b, a]
    torch.testing.assert_close(logits[0], reference_logits(model, [7, 8])[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], reference_logits(model, [3, 4, 5, 6])[-1], rtol=1e-4, atol=1e-4)


def test_virtual_kv_maps_pages_as_the_sequence_grows_and_trims(model, virtual_store):
    runner = Runner(model, virtual_store)
    assert virtual_store.held_bytes == 0
    seq = Sequence(prompt=list(range(40)), max_tokens=4, slot=1)
    run_sequence(runner, seq, chunk=16, new_tokens=[1])
    held = virtual_store.held_bytes
    assert held >= virtual_store.layout.mapped_bytes_for(41) > 0
    virtual_store.release(1)
    assert virtual_store.trim() == held and virtual_store.held_bytes == 0


def test_buckets():
    assert pow2_buckets(1, 8) == [1, 2, 4, 8] and pow2_buckets(1, 6) == [1, 2, 4, 6]
    assert pow2_buckets(256, 4096)[-1] == 4096 and bucket(3, [1, 2, 4, 8]) == 4


def test_virtual_store_ensures_ahead_and_shrinks_exactly(virtual_store):
    calls = []
    real = virtual_store.cache.ensure
    virtual_store.cache.ensure = lambda slot, n, start=None: (calls.append(n), real(slot, n, start))[1]
    for n in range(1, 40):
        virtual_store.ensure(0, n)
    assert calls == [16, 32, 48]                       # once in 16 tokens while growing
    virtual_store.ensure(0, 5)                         # a new, shorter sequence in the slot
    assert calls[-1] == 5 and virtual_store.cache.num_tokens(0) == 5
    virtual_store.release(0)
    assert virtual_store.cache.num_tokens(0) == 0
