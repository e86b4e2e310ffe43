"""The code of the kernels every torch model runs, loaded when the daemon opens the GPU.

Why: CUDA loads a kernel's code into the context the first time the kernel runs
(lazy module loading) and keeps it there until the process ends; torch cannot tear
its context down and build it again while it lives. On the H100 a SmolLM2-135M's
first load and unload left 134 MiB behind with the caching allocator and the page
pool both empty (benchmarks/unload_residue.py): the code of torch's elementwise,
norm, embedding and sampling kernels, cuBLAS's GEMMs for the model's shapes, the
Triton attention kernels. Loading a model once was a permanent cost of the process,
so "after an unload" could never return to "before the first load" (issue 15).

So the daemon pays that cost once, up front: a tiny random-weight model goes
through the torch engine exactly as a served one does (load, a prefill, decode
steps eager and in captured CUDA graphs, unload), at each head size the kernels
are specialised on; without torch.compile (seconds, and its kernels are the
model's own shapes anyway). What stays is the daemon's fixed cost, reported in the log
and measured with the context; every later unload returns to it. Kernels
specialised on a model's own shapes (Inductor's, the quantized matvecs per type)
still load with that model: kilobytes to a few MiB each, not the bulk.
"""
from __future__ import annotations

import logging
import time

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.torch.model.configs import ModelConfig
from engines.types import GenerateRequest, RequestKind, SamplingParams

log = logging.getLogger(__name__)

# The head sizes the attention kernels are compiled for in the families served
# (SmolLM2 and Llama 3.2 run 64, most 7-8B models 128); the rest of the shape is as small
# as the engine allows, so the warm-up costs a fraction of a second and a few MiB.
WARM_UP_HEAD_DIMS = (64, 128)
WARM_UP_CONTEXT = 256
WARM_UP_PROMPT = "warm " * 24  # a prefill of more than one token: the prefill path's kernels
WARM_UP_TOKENS = 4
CAPTURES_WAIT_S = 60.0       # the serving loop captures the other batch buckets while idle


def warm_up_config(head_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=2 * head_dim, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=head_dim, ffn_dim=4 * head_dim, tie_embeddings=True,
                       max_context=WARM_UP_CONTEXT, eos_ids=())


def warm_up_engine_kernels(kv_pool: object, served: EngineConfig) -> float:
    """Run the tiny models through the torch engine on kv_pool's device and give everything
    back; returns the seconds it took. served: the models' engine settings; the warm-up
    decodes with as many slots (so captures every batch bucket they will: cuBLAS picks its
    GEMM kernels by batch size) and with CUDA graphs as they do. Raises what the engine
    raises (the caller logs it: the first served model then loads the code instead)."""
    from engines.torch.engine import TorchEngine

    started = time.monotonic()
    config = EngineConfig(torch_num_slots=served.torch_num_slots, torch_max_context=WARM_UP_CONTEXT,
                          torch_cuda_graphs=served.torch_cuda_graphs, torch_compile=False,
                          torch_weights_to_host=False)
    for head_dim in WARM_UP_HEAD_DIMS:
        cfg = warm_up_config(head_dim)
        info = ModelInfo(name=f"kernel-warm-up-{head_dim}", path="", source="synthetic",
                         metadata={"config": cfg})
        engine = TorchEngine(info, config, kv_pool)
        engine.load()
        try:
            request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=WARM_UP_PROMPT,
                                      sampling=SamplingParams(temperature=0, max_tokens=WARM_UP_TOKENS,
                                                              ignore_eos=True))
            for _ in engine.generate(request):
                pass
            _wait_for_background_captures(engine)
        finally:
            engine.unload()
    return time.monotonic() - started


def import_compiler() -> float:
    """Import torch.compile's machinery (Dynamo, Inductor) now; returns the seconds. Made the
    first time a Runner wraps its decode step, that import cost each daemon's first load ~2 s
    (the CPU build here: `torch.compile(f)` alone, nothing compiled), on the path of the request
    that loaded the model; reloads paid nothing. Nothing is compiled here."""
    import torch

    started = time.monotonic()
    torch.compile(lambda x: x)
    return time.monotonic() - started


def _wait_for_background_captures(engine) -> None:
    """Until the serving loop has captured every decode bucket the load left pending (the
    larger batches' GEMMs load their own kernels), or CAPTURES_WAIT_S passed (logged:
    the first model that decodes such a batch loads that code instead)."""
    if not engine.finish_background_work(CAPTURES_WAIT_S):
        log.warning("kernel warm-up: %d decode graphs still pending after %.0f s", len(engine.runner.pending),
                    CAPTURES_WAIT_S)
