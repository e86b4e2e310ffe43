"""Programmatic dependent launch (engines/torch/kernels/pdl.py) changes when kernels start,
never what they compute: a model's decode steps in CUDA graphs give the same logits, bit for
bit, with the participating kernels launched with and without it, and the kernels under it
read what the kernel before wrote (a chain where each reads its predecessor's output)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engines"))
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

from engines.torch.kernels import pdl  # noqa: E402
from engines.torch.kernels.fused_small import add_rms_norm  # noqa: E402
from engines.torch.kernels.quant_kernels import qmatvec  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from engines.torch.load.gguf_loader import load_gguf  # noqa: E402
from tests.engines.quant_blocks import random_blocks  # noqa: E402

pytestmark = pytest.mark.gpu
# SmolLM2's widths: rows of 576 weights take the short-row launch, Q5_0 its pair decoder
CFG = TINY.replace(dim=576, ffn_dim=1536, num_layers=4, num_heads=9, num_kv_heads=3)
IDS = list(range(40, 72))


@pytest.fixture(autouse=True)
def _pdl_by_device():
    yield
    pdl.set_enabled(None)


def test_the_lent_gpu_runs_pdl():
    assert pdl.supported(torch.device("cuda")), "sm_90 or later expected: the tests below would not exercise PDL"


def _decode_logits(path: Path, enabled: bool, steps: int = 10) -> list[torch.Tensor]:
    from engines.torch.serve.kv_access import KvcachedStore
    from engines.torch.serve.runner import Runner
    from engines.torch.serve.scheduler import PrefillChunk, Sequence, StepPlan
    from kvcached.config import KvcachedConfig
    from kvcached.kv_cache.layout import KVShape
    from kvcached.kv_cache.manager import KVCache
    from kvcached.vmm import open_backend

    pdl.set_enabled(enabled)
    model, _ = load_gguf(path, "cuda", torch.bfloat16)
    config = KvcachedConfig(backend="cuda")
    store = KvcachedStore(KVCache(open_backend(config), KVShape(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim,
                                                                model.dtype), 2, 256, config))
    try:
        runner = Runner(model, store, compile=False)
        seq = Sequence(prompt=IDS, max_tokens=64, slot=0)
        rows = [runner.run(StepPlan(prefills=(PrefillChunk(seq, 0, len(IDS)),)))[0].float().cpu()]
        seq.num_computed = len(IDS)
        for _ in range(steps):
            seq.output.append(int(rows[-1].argmax()))
            rows.append(runner.run(StepPlan(decodes=(seq,)))[0].float().cpu())   # the batch-1 graph
            seq.num_computed += 1
        return rows
    finally:
        store.close()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_graphed_decode_is_bit_equal_with_and_without_pdl(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", CFG, random_state(CFG, seed=5),
                           qtype=gguf.GGMLQuantizationType[qtype])
    without, with_pdl = _decode_logits(path, False), _decode_logits(path, True)
    for step, (a, b) in enumerate(zip(without, with_pdl)):
        assert torch.equal(a, b), f"step {step}: logits differ with PDL"


def test_a_chain_of_pdl_kernels_reads_each_predecessor_in_a_graph():
    """add_rms_norm -> matvec -> add_rms_norm -> ... in one graph, each reading the one
    before (the norm also the residual from two back; every other link a torch op, which
    launches without PDL, in between), replayed with new inputs: a kernel that read before
    its wait would see the last replay's rows."""
    dim, links = 576, 12
    raw = torch.from_numpy(random_blocks("Q5_0", dim, dim, 3).copy())
    weight = QuantWeight.from_gguf(raw, "Q5_0", (dim, dim), "cuda")
    norm_w = torch.ones(dim, device="cuda", dtype=torch.bfloat16)

    def chain(x: torch.Tensor) -> torch.Tensor:
        residual, h = add_rms_norm(x, x, norm_w, 1e-6)
        for link in range(links):
            d = qmatvec(h, weight)
            if link % 2:
                d = d * 0.5
            residual, h = add_rms_norm(residual, d, norm_w, 1e-6)
        return h

    results = {}
    for enabled in (False, True):
        pdl.set_enabled(enabled)
        x = torch.zeros(1, dim, device="cuda", dtype=torch.bfloat16)
        chain(x)                                   # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x)
        outs = []
        for i in range(20):
            x.copy_(torch.randn(1, dim, generator=torch.Generator().manual_seed(i)).to("cuda", torch.bfloat16))
            graph.replay()
            outs.append(out.clone())
        results[enabled] = torch.stack(outs).cpu()
        assert torch.isfinite(results[enabled]).all()
        assert torch.equal(chain(x).cpu(), results[enabled][-1]), "the graph's last replay differs from eager"
    assert torch.equal(results[False], results[True])
