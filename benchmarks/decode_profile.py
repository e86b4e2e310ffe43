"""Where a decode step's GPU time goes: kernel by kernel, against the GEMM floor.

benchmarks/decode.py says how fast a step is; this says why. For each model
(random bf16 weights of a named config) and attention variant it captures the
engine's decode graph, replays it under torch.profiler and lists the kernels
of one step (calls and microseconds per step). Beside it, the floor: the
model's four projections and the LM head as bare F.linear calls at M = 1, 2, 8
rows, timed with CUDA events, and the bandwidth they reach.

    python -m benchmarks.decode_profile [--models smollm2-135m,llama-3.1-8b]
        [--variants triton,triton-no-pdl,torchops] [--steps 50] [--q4km]

Variants: `triton` (the Triton decode attention, and programmatic dependent launch where
the GPU has it: engines/torch/kernels/pdl.py), `triton-no-pdl` (the same kernels launched
one after another as before), `triton-copied-inputs` (`triton` with the step's inputs copied
to the device before each replay, not read from the pinned buffer by its first kernel:
serve/step_inputs.py), `triton-separate-norms` (`triton`
with each add + RMSNorm a kernel of its own, not read by the projection after it:
kernels/normed_input.py), `triton-ungrouped` (`triton` with q, k, v of different types
launched one by one: kernels/quant_group.py), `torchops` (attention as torch ops). Each variant also times batch-1 decode as benchmarks.decode runs it (the host's part included).

--q4km: the named shapes as random Q4_K_M blocks (benchmarks/shape_gguf.py), loaded as the
daemon loads a GGUF (weights in their blocks, the quantized kernels), so the table is the
step users get from their files: how many kernels a layer, and which (issue 16: SmolLM2's
step is bound by their number). Writes decode_profile_q4km.json.
"""
from __future__ import annotations

import argparse
import gc
import logging
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from benchmarks.decode import decode_steps, make_store, prefill
from benchmarks.results_io import print_table, write_result
from engines.torch.kernels import pdl, quant_ops
from engines.torch.serve import step_inputs
from engines.torch.serve.runner import Runner
from engines.torch.serve.scheduler import Sequence, StepPlan

log = logging.getLogger("benchmarks.decode_profile")


def time_cuda(fn, iters: int = 50) -> float:
    """Microseconds per call, CUDA events around `iters` calls after a warm-up."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def gemm_floor(cfg, dtype: torch.dtype) -> dict:
    """The projections of one layer and the LM head as bare GEMMs: us and GB/s per M."""
    q_width = cfg.num_heads * cfg.head_dim
    kv_width = cfg.num_kv_heads * cfg.head_dim
    shapes = {"qkv": (q_width + 2 * kv_width, cfg.dim), "o": (cfg.dim, q_width),
              "gate_up": (2 * cfg.ffn_dim, cfg.dim), "down": (cfg.dim, cfg.ffn_dim),
              "lm_head": (cfg.vocab_size, cfg.dim)}
    weights = {k: torch.randn(*s, device="cuda", dtype=dtype) for k, s in shapes.items()}
    out: dict = {}
    for m in (1, 2, 8):
        row: dict = {}
        step_us = 0.0
        for name, w in weights.items():
            x = torch.randn(m, w.shape[1], device="cuda", dtype=dtype)
            us = time_cuda(lambda: F.linear(x, w))
            row[name] = {"us": round(us, 2), "gb_s": round(w.numel() * w.element_size() / us / 1e3, 1)}
            step_us += us * (1 if name == "lm_head" else cfg.num_layers)
        row["step_gemms_us"] = round(step_us, 1)
        out[f"m{m}"] = row
    return out


def _per_step_us(fn, steps: int) -> float:
    """Host-clock microseconds a step of fn, which ends synchronized, best of three runs."""
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t) / steps)
    return round(1e6 * best, 1)


def host_breakdown(runner: Runner, seq: Sequence, key: tuple[int, int], steps: int) -> dict:
    """Where a batch-1 token's time goes beyond the graph's replay: each line adds one layer of
    the path benchmarks.decode times (the same position written again each time: timing only)."""
    graph, plan = runner.graphs[key], StepPlan(decodes=(seq,))
    # the last position written: mapped (the next one may start an unmapped page)
    tokens, positions, slots = [seq.output[-1]], [seq.num_computed - 1], [seq.slot]
    sync = torch.cuda.synchronize
    with torch.inference_mode():      # the runner's own calls run under it (its buffers are inference tensors)
        return {
            "replay_then_sync_us": _per_step_us(lambda: (graph.graph.replay(), sync()), steps),
            "graph_run_then_sync_us": _per_step_us(lambda: (graph.run(tokens, positions, slots), sync()), steps),
            "runner_run_then_sync_us": _per_step_us(lambda: (runner.run(plan), sync()), steps),
            "runner_run_argmax_tolist_us": _per_step_us(lambda: runner.run(plan).argmax(-1).tolist(), steps),
        }


def kernel_table(model, variant: str, args: argparse.Namespace) -> dict:
    """One captured decode step (batch 1 as the engine runs it), kernel by kernel."""
    cfg = model.cfg
    store = make_store("virtual", cfg, model.dtype, model.device, 8, args.ctx)
    pdl.set_enabled(False if variant.endswith("no-pdl") else None)   # kernels captured below keep it
    step_inputs.set_read_pinned(not variant.endswith("copied-inputs"))
    quant_ops.use_normed_kernels(not variant.endswith("separate-norms"))
    quant_ops.use_group_kernels(not variant.endswith("ungrouped"))
    runner = Runner(model, store, compile=not args.no_compile, triton=variant.startswith("triton"))
    try:
        runner.warm_up()
        seq = Sequence(prompt=list(range(1, 33)), max_tokens=10 ** 6, slot=0)
        prefill(runner, [seq])
        plan = StepPlan(decodes=(seq,))
        for _ in range(args.steps):             # a realistic history length to attend over
            seq.output.append(int(runner.run(plan)[0].argmax()))
            seq.num_computed += 1
        tok_s = max(args.steps / decode_steps(runner, [seq], args.steps) for _ in range(3))
        key = next(k for k in runner.graphs if k[0] >= 1)
        graph = runner.graphs[key].graph
        replay_us = time_cuda(graph.replay, args.steps)
        host = host_breakdown(runner, seq, key, args.steps)
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                graph.replay()
            torch.cuda.synchronize()
        kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels[evt.name[:90]]
                k[0] += 1
                k[1] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        rows = sorted(((n, c / args.steps, us / args.steps) for n, (c, us) in kernels.items()),
                      key=lambda r: -r[2])
        return {"graph_key": list(key), "replay_us": round(replay_us, 1), "decode_b1_tok_s": round(tok_s, 1),
                "pdl": pdl.options(model.device)["USE_PDL"], "host": host,
                "kernels_per_step": round(sum(r[1] for r in rows), 1),
                "kernel_us_per_step": round(sum(r[2] for r in rows), 1),
                "compiled": runner.is_compiled, "triton_attention": runner.kv.use_triton,
                "top": [{"kernel": n, "calls": round(c, 2), "us": round(us, 2)} for n, c, us in rows[:30]]}
    finally:
        pdl.set_enabled(None)
        step_inputs.set_read_pinned(True)
        quant_ops.use_normed_kernels(True)
        quant_ops.use_group_kernels(True)
        store.close()


def load_model(name: str, cfg, q4km: bool):
    """Random bf16 weights of the named config, or (q4km) its random Q4_K_M blocks read as the
    torch engine reads a GGUF file."""
    if not q4km:
        from engines.torch.model.synthetic import synthetic_model

        return synthetic_model(cfg, torch.device("cuda"), torch.bfloat16)
    from benchmarks.shape_gguf import named_block_shape
    from engines.torch.load.gguf_loader import load_gguf

    model, _ = load_gguf(named_block_shape(name), torch.device("cuda"), torch.bfloat16)
    return model


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,llama-3.1-8b")
    p.add_argument("--variants", default="triton,torchops")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--q4km", action="store_true", help="random Q4_K_M blocks of each shape, loaded as a GGUF")
    args = p.parse_args()
    from engines.torch.model.configs import named_config

    results: dict = {"settings": vars(args), "models": {}}
    for name in args.models.split(","):
        cfg = named_config(name)
        row: dict = {"gemm_floor": gemm_floor(cfg, torch.bfloat16)}
        model = load_model(name, cfg, args.q4km)
        for variant in args.variants.split(","):
            try:
                row[variant] = kernel_table(model, variant, args)
            except Exception as exc:  # one variant failing must not lose the others
                log.exception("%s %s failed", name, variant)
                row[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            v = row[variant]
            print(f"\n{name} {variant}: replay {v.get('replay_us')} us, b1 {v.get('decode_b1_tok_s')} tok/s, "
                  f"{v.get('kernels_per_step')} kernels, {v.get('kernel_us_per_step')} us of kernels")
            print("host path, us a step:", v.get("host"))
            print_table(["kernel", "calls/step", "us/step"],
                        [[k["kernel"], k["calls"], k["us"]] for k in v.get("top", [])[:18]])
        floor = row["gemm_floor"]
        print_table(["M", "step GEMMs us", *[k for k in floor["m1"] if k != "step_gemms_us"]],
                    [[m, f["step_gemms_us"], *[f"{v['us']}us {v['gb_s']}GB/s" for k, v in f.items()
                                                if k != "step_gemms_us"]] for m, f in floor.items()])
        results["models"][name] = row
        write_result("decode_profile_q4km" if args.q4km else "decode_profile", results)
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
