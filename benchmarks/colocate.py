"""Three models on one GPU under staggered bursts: a static split against the elastic broker.

Each model gets closed-loop users that ramp from a base to a peak and back
(benchmarks/load_gen.py), the peaks one after another so they never overlap;
every request is a 256-token prompt and 256 generated tokens, streamed from
`ebbtide serve` over HTTP (OpenAI /v1/completions). The same load runs twice,
each against a fresh daemon:

- static: each model may hold at most its weights plus a third of the KV
  memory (per-model max_bytes in settings.toml, which the torch engine's
  admission enforces: a request waits until its KV fits), as a static
  reservation does;
- elastic: the same total budget (budget_bytes), no per-model cap: the broker
  lets the model at its peak take what the idle ones are not using.

Both run the same number of slots (the peak users): only memory differs. The
KV memory is sized so the static third really binds: a third holds 0.4 of one
model's peak users' KV (`--third-of-peak`), the whole 1.2 peaks, so the elastic
model at its peak can hold all its users while the idle ones keep little.
The default models are synthetic llama-3.2-1b: with 8B models the three
base-load streams alone saturated the H100's compute, and TTFT measured decode
throughput, not memory (benchmarks/results/README.md). The budget check reads what the broker counted (weights, mapped KV and
KV promised to admitted requests), sampled through the control API.
Reported: TTFT p50/p95/p99 and throughput per model, overall and while that
model is at its peak, failures, and static/elastic ratios.
Done when the elastic p99 TTFT of each model at its peak is at most a tenth of
the static split's, with zero failed requests.

  H100:  PYTHONPATH=/tmp/site:. python3 benchmarks/colocate.py
  CPU:   .venv/bin/python -m benchmarks.colocate --smoke   (random-weight SmolLM2 shapes, torch)
  Merge two runs of one configuration each:
         python3 benchmarks/colocate.py --merge colocate_static.json colocate_elastic.json
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, sys.path[0] is benchmarks/, whose http.py and engines.py would shadow
    # the standard library's http and the engines package: put the repo root there instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import json
import logging
import math
import random
import tempfile
import time

from benchmarks import e2e_common as common
from benchmarks.daemon_proc import Daemon
from benchmarks.load_gen import Ramp, make_prompt, ratio, staggered_ramps
from benchmarks.results_io import print_table, write_result
from benchmarks.stream_client import make_client, openai_completion, origin_clock, run_users

log = logging.getLogger("colocate")
CONFIGS = ("elastic", "static")  # elastic first: the static split's caps use its measured weights
BUNDLED = "bundled"
TARGET_RATIO = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run: random-weight smollm2-135m models on the torch engine")
    p.add_argument("--configs", default="elastic,static", help="which configurations, in order")
    p.add_argument("--model-config", default=None,
                   help=f"synthetic config of each model (default llama-3.2-1b), or {BUNDLED!r}: "
                        "the bundled SmolLM2 GGUF (smollm2-135m with --smoke)")
    p.add_argument("--num-models", type=int, default=3)
    p.add_argument("--engine", default=None,
                   help="engine per model: auto/torch/llamacpp (default: torch; auto in --smoke)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--base-users", type=int, default=0, help="users of a model away from its peak")
    p.add_argument("--peak-users", type=int, default=32)
    p.add_argument("--rise-s", type=float, default=3.0)
    p.add_argument("--hold-s", type=float, default=15.0)
    p.add_argument("--fall-s", type=float, default=3.0)
    p.add_argument("--think-s", type=float, default=0.5, help="mean pause between a user's requests")
    p.add_argument("--third-of-peak", type=float, default=0.4,
                   help="KV of one static third as a fraction of one model's peak need (0.5: 1.5 peaks in all)")
    p.add_argument("--kv-third", type=int, default=0,
                   help="KV bytes of one static third (0: --third-of-peak of one model's peak need)")
    p.add_argument("--weights-bytes", type=int, default=0,
                   help="weights of one model (0: from the config, or the GGUF's size in --smoke)")
    p.add_argument("--headroom", type=int, default=1 << 30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="colocate", help="result file name")
    p.add_argument("--merge", nargs=2, metavar="JSON", help="merge a static and an elastic result")
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    """Under a minute on a CPU: three random-weight SmolLM2-135M on the torch engine (whose
    admission enforces the split; llama.cpp sizes its KV at load), tiny prompts, few users."""
    args.backend, args.engine = "host", args.engine or "torch"
    args.model_config = args.model_config or "smollm2-135m"
    args.prompt_tokens, args.output_tokens = 24, 8
    args.base_users, args.peak_users = 1, 3
    args.rise_s, args.hold_s, args.fall_s, args.think_s = 0.75, 1.5, 0.75, 0.2
    args.headroom = 64 << 20
    args.name = args.name + "_smoke"


def sizing(args: argparse.Namespace) -> dict:
    """KV per sequence, one model's peak need, the static third and the whole budget.
    The budget counts weights too, as the broker counts what each model holds."""
    config = "smollm2-135m" if args.model_config == BUNDLED else args.model_config
    weights, kv_per_token = common.config_numbers(config)
    if args.smoke:  # on a CPU the torch engine keeps float32 weights and KV; llama.cpp maps the GGUF
        kv_per_token *= 2
        on_torch = args.engine == "torch" or args.model_config != BUNDLED  # synthetic: torch only
        weights = 2 * weights if on_torch else common.bundled_gguf().stat().st_size
    weights = args.weights_bytes or weights
    per_seq = common.page_round(kv_per_token * (args.prompt_tokens + args.output_tokens))
    peak_need = args.peak_users * per_seq
    third = args.kv_third or common.page_round(int(peak_need * args.third_of_peak))
    return {"weights_bytes": weights, "weights_measured": False, "kv_bytes_per_token": kv_per_token,
            "kv_per_seq_bytes": per_seq, "peak_need_bytes": peak_need, "kv_third_bytes": third,
            "budget_bytes": args.num_models * (weights + third)}


def with_measured_weights(size: dict, loaded: dict[str, dict]) -> dict:
    """The static split's third from the weights a run actually loaded: the same budget,
    minus what the weights really take, cut in equal KV thirds."""
    measured = [int(m.get("weights") or 0) for m in loaded.values()]
    if not measured or not all(measured):
        return size
    third = (size["budget_bytes"] - sum(measured)) // len(measured)
    third -= third % (2 << 20)
    if third <= 0:
        log.warning("measured weights %s leave no KV in the budget: keeping the estimate", measured)
        return size
    log.info("measured weights %s: a static third is %.0f MiB of KV", measured, third / (1 << 20))
    return {**size, "weights_bytes": max(measured), "weights_measured": True,
            "weights_by_model": {n: int(m["weights"]) for n, m in loaded.items()}, "kv_third_bytes": third}


def daemon_settings(kind: str, args: argparse.Namespace, models: list[str], size: dict,
                    model_dir: Path | None) -> dict:
    # The same slots in both (the peak users): only what memory each model may hold differs.
    settings = common.base_settings(backend=args.backend, num_slots=args.peak_users,
                                    headroom=args.headroom, model_dir=model_dir,
                                    synthetic=args.model_config != BUNDLED, budget=size["budget_bytes"])
    context = args.prompt_tokens + args.output_tokens + 64
    settings["models"] = {m: {"engine": args.engine, "context_length": max(context, 256)} for m in models}
    if kind == "static":
        # A static reservation of a third: max_bytes, which the torch engine's admission enforces
        # (a request waits until its KV fits in its model's third).
        weights = size.get("weights_by_model", {})
        for m in models:
            settings["models"][m]["max_bytes"] = weights.get(m, size["weights_bytes"]) + size["kv_third_bytes"]
    return settings


def budget_check(timeline: list[dict], size: dict) -> dict:
    """Did the models together stay within budget_bytes, as the broker counted them (weights,
    mapped KV and KV promised to admitted requests)? Only then is the elastic win the broker's
    doing, not just more memory. The mapped bytes alone are reported beside it."""
    counted = [sum(s.get("broker_held", {}).values()) for s in timeline if s.get("broker_held")]
    mapped = [sum((m.get("weights") or 0) + (m.get("kv_held") or 0) for m in s["models"].values())
              for s in timeline]
    peak, peak_mapped = max(counted, default=0), max(mapped, default=0)
    return {"max_held_bytes": peak, "max_mapped_bytes": peak_mapped, "samples": len(counted),
            "budget_bytes": size["budget_bytes"],
            "within_budget": bool(counted) and max(peak, peak_mapped) <= size["budget_bytes"]}


async def run_config(kind: str, args: argparse.Namespace, models: list[str], size: dict,
                     model_dir: Path | None) -> dict:
    settings = daemon_settings(kind, args, models, size, model_dir)
    with Daemon(settings, name=f"colocate-{kind}") as daemon:
        daemon.follow_events()
        async with make_client() as client:
            clock = origin_clock()
            for model in models:  # one after another: loading is not what is measured
                await common.warm_up(client, daemon.base_url, model, clock)
            load_s = clock()
            words = await common.words_for(client, daemon.base_url, models[0], args.prompt_tokens)
            loaded = common.model_memory(daemon.control_get("/control/memory"))
            ramps = staggered_ramps(len(models), base_users=args.base_users, peak_users=args.peak_users,
                                    rise_s=args.rise_s, hold_s=args.hold_s, fall_s=args.fall_s,
                                    lead_s=1.0, tail_s=1.0)
            records, timeline = await drive(client, daemon, models, ramps, words, args)
        events = common.broker_events(daemon.events)
        log_tail = daemon.log_tail(20)
    per_model = {}
    for model, ramp in zip(models, ramps):
        mine = [r for r in records if r.model == model]
        per_model[model] = {"all": common.summarize_records(mine),
                            "at_peak": common.summarize_records([r for r in mine if ramp.at_peak(r.t_send)]),
                            "peak_window_s": [ramp.peak_start_s, ramp.peak_end_s]}
    return {"config": kind, "sizing": size, "settings": settings, "load_s": round(load_s, 2),
            "prompt_words": words, "memory_after_load": loaded, "models": per_model,
            "overall": common.summarize_records(records), "budget": budget_check(timeline, size),
            "memory_timeline": timeline, "broker_events": events,
            "daemon_log_tail": log_tail.splitlines()}


async def drive(client, daemon: Daemon, models: list[str], ramps: list[Ramp], words: int,
                args: argparse.Namespace) -> tuple[list, list]:
    clock = origin_clock()

    def sender(model: str):
        async def send(rng: random.Random):
            prompt = make_prompt(rng, words)
            return await openai_completion(client, daemon.base_url, model, prompt, args.output_tokens, clock)
        return send

    timeline: list[dict] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(common.sample_memory(daemon, 0.25, clock, timeline, stop))
    try:
        records = await run_users([(r, sender(m)) for r, m in zip(ramps, models)], clock,
                                  args.think_s, args.seed)
    finally:
        stop.set()
        await sampler
    return records, timeline


def compare(results: dict[str, dict]) -> dict:
    """Static/elastic ratios per model (TTFT at the model's peak) and the verdict."""
    if not all(k in results for k in CONFIGS):
        return {}
    out, met = {}, True
    for model in results["elastic"]["models"]:
        s = results["static"]["models"].get(model, {})
        e = results["elastic"]["models"][model]
        p99 = ratio(_get(s, "at_peak", "ttft_ms", "p99"), _get(e, "at_peak", "ttft_ms", "p99"))
        out[model] = {"peak_p99_ttft_ratio": _round(p99),
                      "peak_p50_ttft_ratio": _round(ratio(_get(s, "at_peak", "ttft_ms", "p50"),
                                                          _get(e, "at_peak", "ttft_ms", "p50"))),
                      "throughput_ratio_elastic_over_static": _round(ratio(
                          _get(e, "all", "tokens_per_s"), _get(s, "all", "tokens_per_s")))}
        met = met and not math.isnan(p99) and p99 >= TARGET_RATIO
    failures = sum(r["overall"]["failed"] for r in results.values())
    within = bool(results["elastic"].get("budget", {}).get("within_budget"))
    return {"per_model": out, "failed_requests": failures, "target_ratio": TARGET_RATIO,
            "elastic_within_budget": within, "done": bool(met and failures == 0 and within)}


def _get(d: dict, *keys: str) -> float:
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return float(d) if isinstance(d, (int, float)) else math.nan


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


def report(name: str, payload: dict) -> None:
    rows = []
    for kind, res in payload["results"].items():
        for model, m in res["models"].items():
            rows.append([kind, model, m["all"]["requests"], m["all"]["failed"], m["all"]["ttft_ms"]["p50"],
                         m["all"]["ttft_ms"]["p99"], m["at_peak"]["ttft_ms"]["p99"], m["all"]["tokens_per_s"]])
    print_table(["config", "model", "requests", "failed", "ttft p50 ms", "ttft p99 ms",
                 "peak p99 ms", "tok/s"], rows)
    for model, c in payload.get("comparison", {}).get("per_model", {}).items():
        print(f"{model}: static/elastic p99 TTFT at its peak = {c['peak_p99_ttft_ratio']}x")
    for kind, res in payload["results"].items():
        check = res.get("budget", {})
        print(f"{kind}: models held at most {check.get('max_held_bytes', 0) / (1 << 30):.2f} GiB "
              f"of a {check.get('budget_bytes', 0) / (1 << 30):.2f} GiB budget")
    if payload.get("comparison"):
        print(f"done (>= {TARGET_RATIO:g}x, no failures, elastic within budget): "
              f"{payload['comparison']['done']}")
    print(f"wrote {write_result(name, payload)}")


def merge(paths: list[str], name: str) -> int:
    results: dict[str, dict] = {}
    head: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        results.update(data["results"])
        head = head or {k: data[k] for k in ("device", "sizing", "args") if k in data}
    report(name, {**head, "results": results, "comparison": compare(results), "merged_from": paths})
    return 0


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge(args.merge, args.name)
    if args.smoke:
        apply_smoke(args)
    args.engine = args.engine or "torch"
    args.model_config = args.model_config or "llama-3.2-1b"
    kinds = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CONFIGS]
    if unknown or not kinds:
        raise SystemExit(f"--configs: {unknown or kinds} is not a list of {', '.join(CONFIGS)}")
    size = sizing(args)
    log.info("sizing: %s", size)
    started = time.time()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="colocate-models-") as tmp:
        bundled = args.model_config == BUNDLED
        model_dir = Path(tmp) if bundled else None
        names = [f"colocate-{chr(97 + i)}" for i in range(args.num_models)]
        models = (common.smoke_models(model_dir, names) if bundled
                  else common.synthetic_models(args.model_config, args.num_models))
        for kind in kinds:
            results[kind] = asyncio.run(run_config(kind, args, models, size, model_dir))
            if not args.weights_bytes and not size["weights_measured"]:
                size = with_measured_weights(size, results[kind]["memory_after_load"])
    payload = {"args": vars(args), "sizing": size, "wall_s": round(time.time() - started, 1),
               "results": results, "comparison": compare(results)}
    suffix = "" if len(kinds) == len(CONFIGS) else "_" + "_".join(kinds)
    report(args.name + suffix, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
