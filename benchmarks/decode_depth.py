"""Decode at long context against llama.cpp's CUDA build: the tokens a coding agent's step sees.

The quantized benchmark (quant_decode.py) decodes after a 32-token prompt, where
attention is a few percent of a step. Agents send 4-32k tokens of files and tool
output, and there attention reads the whole history every token: Ebbtide's decode
attention (kernels/decode_attention.py) walks a slot's history in one program per KV
head (8 programs for Llama-3.1-8B, 3 for SmolLM2), llama.cpp's splits it across many
(flash decoding). This measures what that costs, in one run on the same file:

- ours: the file loaded as the daemon loads it (weights in blocks, KV in kvcached
  virtual tensors, the decode step compiled and captured), one sequence prefilled to
  each depth, then batch-1 decode tok/s (best of 3); once as served (one program a KV
  head) and once with each history split in pieces of --pieces keys (flash decoding,
  `SlotKV.use_pieces`, not yet the engine's default: this says whether it should be);
- llama.cpp: llama-bench -ngl 99 -fa 1 -p 0 -n STEPS -d DEPTH (tg after DEPTH tokens).

    python -m benchmarks.decode_depth [--models llama-3.1-8b] [--depths 512,4096,16384]
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from benchmarks.decode import decode_steps, make_store, prefill  # noqa: E402
from benchmarks.llama_peer import llama_bench_depth, start_build  # noqa: E402
from benchmarks.quant_decode import Clock, load_measured, measure_sides  # noqa: E402
from benchmarks.results_io import print_table, write_result  # noqa: E402
from benchmarks.shape_gguf import named_block_shape  # noqa: E402
from engines.torch.serve.runner import Runner  # noqa: E402
from engines.torch.serve.scheduler import Sequence  # noqa: E402

log = logging.getLogger("benchmarks.decode_depth")


def ours_at_depths(path: Path, depths: list[int], steps: int, pieces: int | None = None) -> dict[int, float]:
    """Batch-1 decode tok/s after a prompt of each depth, one slot of max(depths) + steps tokens;
    pieces: the decode attention splits each history in pieces of that many keys (flash decoding)."""
    model, _ = load_measured(path)
    store = make_store("virtual", model.cfg, model.dtype, model.device, 1, max(depths) + steps + 64)
    rates: dict[int, float] = {}
    try:
        runner = Runner(model, store)
        if pieces:
            runner.kv.use_pieces(pieces)
        runner.warm_up()
        gen = torch.Generator().manual_seed(0)
        for depth in depths:
            seq = Sequence(prompt=torch.randint(0, model.cfg.vocab_size, (depth,), generator=gen).tolist(),
                           max_tokens=10 ** 6, slot=0)
            prefill(runner, [seq])
            decode_steps(runner, [seq], 3)
            rates[depth] = max(steps / decode_steps(runner, [seq], steps) for _ in range(3))
            log.info("%s: depth %d, %.1f tok/s", path.name, depth, rates[depth])
            store.release(0)
    finally:
        store.close()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rates


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3.1-8b")
    parser.add_argument("--depths", default="512,4096,16384")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--pieces", type=int, default=512, help="keys a program with flash decoding on")
    parser.add_argument("--src", type=Path, default=_ROOT / ".gpu" / "llama.cpp-src.tar.xz")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--name", default="decode_depth")
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    depths = [int(d) for d in args.depths.split(",")]
    build = start_build(args.src, _ROOT / "build" / "quant")
    results: dict = {"files": {}, "settings": {k: str(v) for k, v in vars(args).items()}}
    table = []
    for model in args.models.split(","):
        path = named_block_shape(model)            # random Q4_K_M blocks, as quant_decode --blocks
        row: dict = results["files"].setdefault(f"{model} Q4_K_M", {})
        measure_sides(row, model, (
            ("torch", lambda: ours_at_depths(path, depths, args.steps)),
            ("torch_pieces", lambda: ours_at_depths(path, depths, args.steps, args.pieces)),
            ("llama_cpp", lambda: llama_bench_depth(build, path, tuple(depths), args.steps, clock.left())
             if build.wait(clock.left() - 60) else {"error": "llama.cpp did not build"})),
            lambda: write_result(args.name, results))
        for depth in depths:
            ours, split, theirs = (row[side].get(depth) for side in ("torch", "torch_pieces", "llama_cpp"))
            table.append([model, depth, ours or "-", split or "-", theirs or "-",
                          max(ours or 0, split or 0) / theirs if (ours or split) and theirs else "-"])
    print_table(["model", "depth", "b1 ours", f"b1 ours, pieces of {args.pieces}", "b1 llama.cpp",
                 "best ratio"], table)
    print(f"results: {write_result(args.name, results)}")


if __name__ == "__main__":
    main()
