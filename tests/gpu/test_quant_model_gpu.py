"""Quantized GGUF weights on CUDA (issue 16): a file loads with its weights in
their blocks on the device, they hold the file's tensor bytes in the CUDA
allocator, and the model's logits (prefill) and greedy tokens (the runner's
CUDA-graph decode over kvcached KV) follow the same file on the CPU float path.
Files are written by gguf-py here (Q8_0, Q4_0, Q4_1: the types it quantizes;
the K-quants come through benchmarks/quant_decode.py's llama-quantize)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engines"))
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

from engines.torch.load.gguf_loader import load_gguf, open_reader  # noqa: E402
from engines.torch.load.gguf_names import hf_name  # noqa: E402
from engines.torch.model.attention import ContiguousKV  # noqa: E402
from engines.torch.quant.modules import QuantLinear  # noqa: E402

pytestmark = pytest.mark.gpu
CFG = TINY.replace(dim=512, ffn_dim=1024, num_layers=3, num_heads=8, num_kv_heads=2)
IDS = list(range(40, 72))


def logits(model, ids=IDS) -> torch.Tensor:
    cfg, dev = model.cfg, model.device
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, model.dtype, dev)
    with torch.inference_mode():
        return model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None], kv)[0].float().cpu()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_file_on_cuda_matches_cpu_and_holds_file_bytes(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", CFG, random_state(CFG), qtype=gguf.GGMLQuantizationType[qtype])
    file_bytes = sum(int(t.n_bytes) for t in open_reader(path).tensors if hf_name(t.name) is not None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model, _ = load_gguf(path, "cuda")
    held = torch.cuda.memory_allocated() - before
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.qweight.device.type == "cuda"
    # Norms go from F32 to bf16 (smaller); the blocks are the file's bytes.
    assert 0.9 * file_bytes <= held <= 1.03 * file_bytes, (held, file_bytes)
    assert model.weight_bytes() <= 1.03 * file_bytes
    reference, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    ours, ref = logits(model), logits(reference)
    assert torch.corrcoef(torch.stack([ours.ravel(), ref.ravel()]))[0, 1] > 0.995
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_runner_decodes_quantized_weights_in_cuda_graphs(tmp_path):
    """The engine's own decode: CUDA graphs over kvcached KV with QuantLinear inside,
    greedy tokens against the CPU float path's (which reads the same blocks)."""
    from engines.torch.serve.kv_access import KvcachedStore
    from engines.torch.serve.runner import Runner
    from engines.torch.serve.scheduler import PrefillChunk, Sequence, StepPlan
    from kvcached.config import KvcachedConfig
    from kvcached.kv_cache.layout import KVShape
    from kvcached.kv_cache.manager import KVCache
    from kvcached.vmm import open_backend

    path = write_tiny_gguf(tmp_path / "q8.gguf", CFG, random_state(CFG, seed=3),
                           qtype=gguf.GGMLQuantizationType.Q8_0)
    tokens = {}
    for device in ("cuda", "cpu"):
        model, _ = load_gguf(path, device, torch.float32, llamacpp_numerics=False)
        config = KvcachedConfig(backend="cuda" if device == "cuda" else "host")
        shape = KVShape(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, model.dtype)
        store = KvcachedStore(KVCache(open_backend(config), shape, 2, 256, config))
        try:
            runner = Runner(model, store, compile=False)
            assert runner.use_graphs == (device == "cuda")
            seq = Sequence(prompt=IDS, max_tokens=16, slot=0)
            out = [int(runner.run(StepPlan(prefills=(PrefillChunk(seq, 0, len(IDS)),)))[0].argmax())]
            seq.num_computed = len(IDS)
            seq.output.append(out[-1])
            for _ in range(12):
                out.append(int(runner.run(StepPlan(decodes=(seq,)))[0].argmax()))
                seq.num_computed += 1
                seq.output.append(out[-1])
            tokens[device] = out
        finally:
            store.close()
    assert tokens["cuda"] == tokens["cpu"]


def test_engine_serves_a_quantized_file_with_its_defaults(tmp_path):
    """The torch engine as the daemon builds it on CUDA (torch.compile, CUDA graphs,
    Triton attention): a quantized file loads with no fallback and answers, and its
    memory report counts the blocks."""
    from engines.base import ModelInfo
    from engines.config import EngineConfig
    from engines.torch.engine import TorchEngine
    from engines.types import GenerateRequest, RequestKind, SamplingParams
    from kvcached.config import KvcachedConfig
    from kvcached.standalone import standalone_pool

    path = write_tiny_gguf(tmp_path / "q4.gguf", CFG, random_state(CFG), qtype=gguf.GGMLQuantizationType.Q4_0)
    file_bytes = sum(int(t.n_bytes) for t in open_reader(path).tensors if hf_name(t.name) is not None)
    pool = standalone_pool(KvcachedConfig(backend="cuda"))
    engine = TorchEngine(ModelInfo(name="tiny-q4", path=str(path), family="llama"),
                         EngineConfig(torch_max_context=256, torch_num_slots=2), pool)
    engine.load()
    try:
        request = GenerateRequest(RequestKind.COMPLETION, SamplingParams(max_tokens=8, temperature=0.0),
                                  prompt="hello")
        assert list(engine.generate(request))[-1].finish_reason
        assert engine.memory().weights_bytes <= 1.03 * file_bytes
    finally:
        engine.unload()
        pool.close()
