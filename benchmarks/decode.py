"""Decode and prefill speed of the torch engine (issue 5 item 7).

On CUDA: SmolLM2-135M, llama-3.2-1b and llama-3.1-8b shapes with random bf16
weights (speed depends on shapes and bytes, not values), batch-1 and batch-8
decode tok/s and prefill tok/s, each with the KV in kvcached virtual tensors
and in one static preallocated tensor of the same layout (the cost of mapping
on demand), side by side with Hugging Face transformers' generate on the same
config, and the memory-bandwidth limit (weight bytes / bandwidth measured by a
large device-to-device copy). On the CPU: the bundled SmolLM2-135M GGUF
against llama-cpp-python on the same file.

Decode is timed as the engine serves: the runner's step (CUDA graph) plus the
greedy pick of each next token on the host, one step after another, best of
three runs (all three kept in the JSON).

    python -m benchmarks.decode [--models smollm2-135m,llama-3.1-8b] [--steps 128] [--no-hf]
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on the path; the repository root must
# come first so `engines` and `kvcached` resolve to the packages.
_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from benchmarks.results_io import print_table, write_result  # noqa: E402
from engines.torch.serve.kv_access import KVStore, KvcachedStore, StaticStore, kv_layout  # noqa: E402
from engines.torch.serve.runner import Runner  # noqa: E402
from engines.torch.serve.scheduler import PrefillChunk, Sequence, StepPlan  # noqa: E402

log = logging.getLogger("benchmarks.decode")
GPU_MODELS = ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b")
PAGE = 2 << 20
REPEATS = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best


def make_store(kind: str, cfg, dtype: torch.dtype, device: torch.device, slots: int, ctx: int) -> KVStore:
    if kind == "static":
        return StaticStore(kv_layout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, slots, ctx, PAGE),
                           dtype, device)
    from kvcached.config import KvcachedConfig
    from kvcached.kv_cache.layout import KVShape
    from kvcached.kv_cache.manager import KVCache
    from kvcached.vmm import open_backend

    config = KvcachedConfig(backend="cuda" if device.type == "cuda" else "host", page_size=PAGE)
    shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    return KvcachedStore(KVCache(open_backend(config), shape, slots, ctx, config))


def prefill(runner: Runner, seqs: list[Sequence]) -> float:
    """Prefill every sequence (one chunk each); returns seconds; seeds each with its first token."""
    sync(runner.device)
    t = time.perf_counter()
    for seq in seqs:
        logits = runner.run(StepPlan(prefills=(PrefillChunk(seq, 0, len(seq.prompt)),)))
        seq.num_computed = len(seq.prompt)
        seq.output.append(int(logits[0].argmax()))
    sync(runner.device)
    return time.perf_counter() - t


def decode_steps(runner: Runner, seqs: list[Sequence], steps: int) -> float:
    """`steps` greedy decode steps over all seqs as the engine runs them; returns seconds."""
    plan = StepPlan(decodes=tuple(seqs))
    sync(runner.device)
    t = time.perf_counter()
    for _ in range(steps):
        tokens = runner.run(plan).argmax(-1).tolist()
        for seq, token in zip(seqs, tokens):
            seq.num_computed += 1
            seq.output.append(token)
    sync(runner.device)
    return time.perf_counter() - t


def bench_engine(model, kind: str, args: argparse.Namespace) -> dict:
    cfg, device = model.cfg, model.device
    store = make_store(kind, cfg, model.dtype, device, 8, args.ctx)
    runner = Runner(model, store, compile=args.compile if device.type == "cuda" else False,
                    triton=args.triton and device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    out: dict = {"compiled": runner.is_compiled, "triton_attention": runner.kv.use_triton}
    try:
        # As the engine's load does: compile and capture the buckets, and (compiled) time batch
        # 1's eager graph against the compiled one (engines/torch/serve/batch_one.py).
        t_warm = time.perf_counter()
        runner.warm_up()
        out["warm_up_s"] = time.perf_counter() - t_warm
        if runner.is_compiled:   # batch_one's choice for a lone request
            out["batch_one"] = runner.batch_one_kind if 1 in runner.batch_buckets else "compiled as batch 2"
        long = [Sequence(prompt=torch.randint(0, cfg.vocab_size, (args.prefill,), generator=gen).tolist(),
                         max_tokens=1, slot=7)]
        prefill(runner, long)                                    # warm-up (kernels, allocator)
        long[0] = Sequence(prompt=long[0].prompt, max_tokens=1, slot=7)
        out["prefill_tok_s"] = args.prefill / prefill(runner, long)
        for batch in (1, 8):
            seqs = [Sequence(prompt=torch.randint(0, cfg.vocab_size, (32,), generator=gen).tolist(),
                             max_tokens=10 ** 6, slot=i) for i in range(batch)]
            prefill(runner, seqs)
            t_first = time.perf_counter()
            decode_steps(runner, seqs, 3)                         # the first steps (graphs captured above)
            out[f"warmup_b{batch}_s"] = time.perf_counter() - t_first
            # Best of REPEATS: on the lent machine the same run varies by up to ~8% (decode_host.json),
            # always slower, never faster, so the best is the steadiest estimate of each KV kind.
            rates = [batch * args.steps / decode_steps(runner, seqs, args.steps) for _ in range(REPEATS)]
            out[f"decode_b{batch}_tok_s"] = max(rates)
            out[f"decode_b{batch}_tok_s_runs"] = [round(r, 1) for r in rates]
        graph = runner.graphs.get((runner.batch_buckets[0], runner.read_buckets[0]))
        if graph is not None:   # the GPU time of one captured step alone, without the host's part
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                graph.graph.replay()
            sync(device)
            out["graph_replay_b1_ms"] = 1000 * (time.perf_counter() - t) / args.steps
        out["kv_held_bytes"] = store.held_bytes
    finally:
        store.close()
    return out


def bench_hf(cfg, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    """transformers' generate on a LlamaForCausalLM of the same shapes, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = None
    if cfg.rope_scaling.kind == "llama3":
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                         rope_scaling=rope, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
                         max_position_embeddings=cfg.max_context)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    out = {}
    try:
        for batch in (1, 8):
            ids = torch.randint(0, cfg.vocab_size, (batch, 32), device=device)
            kw = dict(max_new_tokens=args.hf_steps, min_new_tokens=args.hf_steps, do_sample=False,
                      pad_token_id=0)
            model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})    # warm-up
            rates = []
            for _ in range(REPEATS):      # best of REPEATS, as for the engine
                sync(device)
                t = time.perf_counter()
                model.generate(ids, **kw)
                sync(device)
                rates.append(batch * args.hf_steps / (time.perf_counter() - t))
            out[f"decode_b{batch}_tok_s"] = max(rates)
            out[f"decode_b{batch}_tok_s_runs"] = [round(r, 2) for r in rates]
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def bench_gpu(args: argparse.Namespace) -> dict:
    from engines.torch.model.configs import named_config
    from engines.torch.model.synthetic import synthetic_model

    device = torch.device("cuda")
    bandwidth = measure_bandwidth(device)
    results: dict = {"bandwidth_gb_s": bandwidth / 1e9, "models": {}}
    for name in args.models.split(","):
        cfg = named_config(name)
        model = synthetic_model(cfg, device, torch.bfloat16)
        weight_bytes = model.weight_bytes()
        # A token reads only its top-k experts: the limit counts the weights a step reads.
        read_bytes = weight_bytes * cfg.num_active_params / cfg.num_params
        row: dict = {"weights_bytes": weight_bytes, "bandwidth_limit_tok_s": bandwidth / read_bytes}
        for variant in args.kv.split(","):
            try:
                row[variant] = bench_hf(cfg, torch.bfloat16, device, args) if variant == "hf" \
                    else bench_engine(model, variant, args)
            except Exception as exc:  # one failing variant must not lose the others' numbers
                log.exception("%s: %s failed", name, variant)
                row[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name} {variant}: {row[variant]}", flush=True)
            results["models"][name] = row
            write_result(f"decode_gpu_{name}", {**results, "settings": vars(args)})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return results


def bench_cpu(args: argparse.Namespace) -> dict:
    from engines.torch.load.gguf_loader import bundled_model_path, load_gguf

    path = bundled_model_path()
    model, _ = load_gguf(path)
    row: dict = {"weights_bytes": model.weight_bytes()}
    for kind in [k for k in args.kv.split(",") if k != "hf"]:   # transformers runs on the GPU only
        row[kind] = bench_engine(model, kind, args)
    del model
    try:
        row["llama_cpp"] = bench_llamacpp(path, args)
    except ImportError as exc:
        row["llama_cpp"] = {"error": f"llama-cpp-python missing: {exc}"}
    return {"models": {"smollm2-135m (GGUF Q4_1)": row}}


def bench_llamacpp(path: Path, args: argparse.Namespace) -> dict:
    from engines.llamacpp.native import plain_llama  # use_extra_bufts really off (AMX)

    llm = plain_llama(str(path), n_ctx=args.ctx, n_batch=args.prefill, verbose=False)
    prompt = list(range(100, 100 + args.prefill))
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    out = {"prefill_tok_s": args.prefill / (time.perf_counter() - t)}
    llm.reset()
    llm.eval(prompt[:32])
    t = time.perf_counter()
    for _ in range(args.steps):
        # Greedy through llama.cpp's own sampler: without logits_all, llm.scores stays zero.
        llm.eval([llm.sample(top_k=1, temp=0.0)])
    out["decode_b1_tok_s"] = args.steps / (time.perf_counter() - t)
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_cuda = torch.cuda.is_available()
    parser.add_argument("--models", default=",".join(GPU_MODELS))
    parser.add_argument("--kv", default="static,hf,virtual",
                        help="variants in order: static, virtual (KV), hf (transformers)")
    parser.add_argument("--steps", type=int, default=128 if on_cuda else 16)
    parser.add_argument("--hf-steps", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512 if on_cuda else 128)
    parser.add_argument("--ctx", type=int, default=1024 if on_cuda else 512)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-triton", dest="triton", action="store_false",
                        help="attention of decode as torch ops instead of the one Triton kernel")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = bench_gpu(args) if on_cuda else bench_cpu(args)
    results["settings"] = vars(args)
    print_table(["model", "variant", "prefill tok/s", "decode b1 tok/s", "decode b8 tok/s"],
                [[name, kind, vals.get("prefill_tok_s", "-"), vals.get("decode_b1_tok_s", "-"),
                  vals.get("decode_b8_tok_s", vals.get("error", "-"))]
                 for name, row in results["models"].items()
                 for kind, vals in row.items() if isinstance(vals, dict)])
    print(f"results: {write_result('decode_gpu' if on_cuda else 'decode_cpu', results)}")


if __name__ == "__main__":
    main()
