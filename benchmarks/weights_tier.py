"""The broker's rungs for one model, measured: what each gives back, how fast, and how soon
the model answers again (issue 19).

For each model (a random-weight F16 GGUF of a named shape, written here with the
`gguf` writer: engines.torch.load.gguf_writer), served by the torch engine on the
GPU with a conversation of --prompt-tokens cached:

  pause            KV to host memory (the weights stay)
  weights_to_host  KV and weights to host memory: nothing of the model on the device
  unload           everything freed; the next request loads the file again

per rung: bytes given back, seconds to give them back, and the time to the first
token of the next turn of the same conversation (the model coming back inside it).
Beside them, in the same run: the raw pinned copy of the weights' bytes each way
(torch copies, pinned buffer allocated beforehand), so the rung's give-back and
restore rates read as a fraction of what the PCIe link does. The weights rung is
timed twice: the first step aside allocates the pinned host buffer (~0.5 s/GiB),
the second reuses it, as every later one does.

With llama.cpp's sources carried (.gpu/llama.cpp-src.tar.xz, scripts/fetch_llama_src.sh),
its CUDA build is made in the background meanwhile (benchmarks/llama_peer.py) and
timed loading each file and producing one token (what Ollama pays to bring an
unloaded model back), beside the weights rung's next token.

  python -m benchmarks.weights_tier [--models qwen2.5-coder-1.5b,llama-3.1-8b] [--out build/shapes]
Goal (issue 19): from weights_to_host, the next token >= 10x sooner than after an
unload and reload of the same file; weights given back at >= 0.75x raw pinned copy.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from benchmarks.llama_peer import load_and_first_token_s, start_build
from benchmarks.results_io import print_table, write_result
from benchmarks.shape_gguf import write_shape
from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.torch.engine import TorchEngine
from engines.torch.model.configs import named_config
from engines.types import GenerateRequest, RequestKind, SamplingParams
from kvcached.standalone import standalone_pool

log = logging.getLogger("benchmarks.weights_tier")
GB = 1e9
ON_CUDA = torch.cuda.is_available()   # on the CPU it runs too, as a smoke test of the benchmark


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def raw_pinned_copy_gbps(nbytes: int, repeats: int = 3) -> tuple[float, float]:
    """(device->host, host->device) GB/s of one pinned copy of nbytes, best of `repeats`."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if ON_CUDA else "cpu")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=ON_CUDA)
    rates = {"d2h": 0.0, "h2d": 0.0}
    for _ in range(repeats):
        for way, (dst, src) in {"d2h": (host, device), "h2d": (device, host)}.items():
            sync()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            sync()
            rates[way] = max(rates[way], nbytes / (time.perf_counter() - t) / GB)
    del device, host
    if ON_CUDA:
        torch.cuda.empty_cache()
    return rates["d2h"], rates["h2d"]


def turn(engine: TorchEngine, prompt: str) -> tuple[float, str]:
    """(seconds to the first token, the text) of a one-token greedy continuation."""
    request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                              sampling=SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t = time.perf_counter()
    stream = engine.generate(request)
    first = next(stream)
    ttft = time.perf_counter() - t
    text = first.text + "".join(c.text for c in stream)
    return ttft, text


def rung_row(engine: TorchEngine, step: str, prompt: str) -> dict:
    """Give back by `step`, then ask the next turn of the conversation."""
    turn(engine, prompt)                        # the conversation cached, the model warm
    weights = engine.weights
    t = time.perf_counter()
    freed = getattr(engine, step)()
    give_back_s = time.perf_counter() - t
    ttft, _ = turn(engine, prompt + " and")
    row = {"rung": step, "given_back_bytes": freed, "give_back_s": give_back_s, "next_token_s": ttft}
    if step == "weights_to_host" and weights is not None:
        row["weights_bytes"] = weights.arena.nbytes
    return row


def weights_cycle(engine: TorchEngine) -> dict:
    """The weights alone to host and back (the KV paused first, as the ladder does): GB/s."""
    engine.pause()
    arena = engine.weights.arena
    out = {}
    for attempt in ("first", "second"):
        sync()
        t = time.perf_counter()
        arena.to_host()
        out[f"to_host_{attempt}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        arena.restore()
        out[f"restore_{attempt}_s"] = time.perf_counter() - t
    out["to_host_gbps"] = arena.nbytes / out["to_host_second_s"] / GB
    out["restore_gbps"] = arena.nbytes / out["restore_second_s"] / GB
    engine.resume()
    return out


def measure(path: Path, name: str, prompt_tokens: int) -> dict:
    config = EngineConfig(torch_num_slots=4, torch_max_context=max(2048, 4 * prompt_tokens),
                          torch_llamacpp_numerics=False, torch_weights_to_host=True)
    engine = TorchEngine(ModelInfo(name=name, path=str(path)), config, standalone_pool())
    t = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - t
    prompt = "".join(chr(97 + i % 26) for i in range(prompt_tokens))   # a byte-level vocabulary: a token a letter
    warm_ttft = min(turn(engine, prompt + " x")[0] for _ in range(3))
    arena_bytes = engine.weights.arena.nbytes
    d2h, h2d = raw_pinned_copy_gbps(arena_bytes)
    cycle = weights_cycle(engine)
    rows = [rung_row(engine, step, prompt) for step in ("pause", "weights_to_host", "weights_to_host", "unload")]
    engine.unload()
    reload_ttft = rows[-1]["next_token_s"]
    host_ttft = statistics.median(r["next_token_s"] for r in rows if r["rung"] == "weights_to_host")
    return {"model": name, "file": str(path), "file_bytes": path.stat().st_size, "weights_bytes": arena_bytes,
            "weights_rung_next_token_s": host_ttft,
            "first_load_s": load_s, "warm_next_token_s": warm_ttft, "prompt_tokens": prompt_tokens,
            "raw_pinned_d2h_gbps": d2h, "raw_pinned_h2d_gbps": h2d, **cycle,
            "to_host_x_raw": cycle["to_host_gbps"] / d2h, "restore_x_raw": cycle["restore_gbps"] / h2d,
            "rungs": rows, "reload_over_weights_rung": reload_ttft / host_ttft}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="qwen2.5-coder-1.5b,llama-3.1-8b")
    parser.add_argument("--out", default="build/shapes")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--llama-src", type=Path, default=Path(".gpu/llama.cpp-src.tar.xz"))
    parser.add_argument("--llama-build-s", type=float, default=360, help="how long to wait for its build")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build = start_build(args.llama_src, Path("build/quant"), jobs=12) if ON_CUDA and args.llama_src.exists() else None
    results = []
    for model in args.models.split(","):
        path = write_shape(named_config(model), Path(args.out) / f"{model}-F16.gguf")
        results.append(measure(path, model, args.prompt_tokens))
        r = results[-1]
        print_table(["model", "rung", "given back GB", "give back s", "next token s"],
                    [[model, row["rung"], row["given_back_bytes"] / GB, row["give_back_s"], row["next_token_s"]]
                     for row in r["rungs"]])
        print_table(["model", "weights GB", "to host GB/s (x raw)", "restore GB/s (x raw)", "reload / weights rung"],
                    [[model, r["weights_bytes"] / GB, f"{r['to_host_gbps']:.1f} ({r['to_host_x_raw']:.2f}x)",
                      f"{r['restore_gbps']:.1f} ({r['restore_x_raw']:.2f}x)", f"{r['reload_over_weights_rung']:.0f}x"]])
        write_result("weights_tier", {"models": results,
                                      "goal": "reload_over_weights_rung >= 10, to_host_x_raw >= 0.75"})
    if build is not None and build.wait(args.llama_build_s):
        for r in results:
            peer = load_and_first_token_s(build.binary("llama-completion"), Path(r["file"]))
            r["llama_cpp_load_and_first_token"] = peer
            if "best_s" in peer:
                r["llama_load_over_weights_rung"] = peer["best_s"] / r["weights_rung_next_token_s"]
        print_table(["model", "llama.cpp load + 1 token s", "weights rung next token s", "ratio"],
                    [[r["model"], r["llama_cpp_load_and_first_token"].get("best_s", "error"),
                      r["weights_rung_next_token_s"], r.get("llama_load_over_weights_rung", "-")] for r in results])
        write_result("weights_tier", {"models": results,
                                      "goal": "reload_over_weights_rung >= 10, to_host_x_raw >= 0.75"})


if __name__ == "__main__":
    main()
