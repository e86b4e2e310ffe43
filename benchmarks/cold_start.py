"""How long a cold model makes its first request wait, and where the time goes (issue 22).

For one GGUF (default: the bundled SmolLM2-135M) served by the torch engine of a
real daemon, three first tokens, each the first request's time to its first
streamed token (the load happens inside it, as a user meets it):

  first_start  a fresh install: empty compiled-kernel cache (engines/compile_cache.py)
  restart      the daemon restarted with the same home: kernels cached on disk
  reload       the model unloaded (control API) and asked for again in the same process

with the engine's load phases (engines/phases.py, from /api/ps) for each. With
--llama-simple, the reference: llama.cpp's own `llama-simple` (CUDA build, all
layers on the GPU) loading the same file and producing one token, timed as a
whole process, best of --runs (what Ollama pays when it reloads a model).

  python -m benchmarks.cold_start [--gguf FILE] [--llama-simple PATH]
Writes benchmarks/results/cold_start[_<name>].json.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.daemon_proc import Daemon
from benchmarks.e2e_common import base_settings, bundled_gguf, setup_logging
from benchmarks.results_io import print_table, write_result
from benchmarks.stream_client import openai_completion

FIRST_TOKEN_TIMEOUT_S = 600.0


def first_token_s(daemon: Daemon, model: str) -> float:
    """Seconds from sending a one-token completion to its first streamed token."""
    async def once() -> float:
        async with httpx.AsyncClient(timeout=FIRST_TOKEN_TIMEOUT_S, trust_env=False) as client:
            record = await openai_completion(client, daemon.base_url, model, "Hello", 1, time.monotonic, tag="cold")
        if not record.ok:
            raise RuntimeError(f"first request to {model} failed: {record.error}\n{daemon.log_tail()}")
        return record.ttft
    return asyncio.run(once())


def load_phases(daemon: Daemon, model: str) -> dict[str, float]:
    running = httpx.get(f"{daemon.base_url}/api/ps", trust_env=False, timeout=30).json()["models"]
    return next((m.get("load_phases_s", {}) for m in running if m["name"] == model), {})


def settings_for(model_dir: Path, model: str) -> dict:
    settings = base_settings(backend="auto", num_slots=8, headroom=0, model_dir=model_dir, synthetic=False)
    settings["models"] = {model: {"engine": "torch"}}
    return settings


def measure_daemon(gguf: Path, model: str) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="ebbtide-cold-"))
    model_dir = home / "gguf"
    model_dir.mkdir()
    (model_dir / f"{model}.gguf").symlink_to(gguf.resolve())
    rows = []
    try:
        for case in ("first_start", "restart"):
            # The same home (and so the same compiled-kernel cache) both times.
            with Daemon(settings_for(model_dir, model), name=f"cold-{case}", home=home / "daemon") as daemon:
                rows.append({"case": case, "first_token_s": first_token_s(daemon, model),
                             "load_phases_s": load_phases(daemon, model)})
                if case == "restart":
                    daemon.control.request("POST", f"/control/models/{model}/unload")
                    rows.append({"case": "reload", "first_token_s": first_token_s(daemon, model),
                                 "load_phases_s": load_phases(daemon, model)})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rows


def llama_simple_s(binary: Path, gguf: Path, runs: int) -> dict:
    """llama.cpp's whole process (CUDA init, load, one token), best of runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([str(binary), "-m", str(gguf), "-n", "1", "-ngl", "99", "Hello"],
                              capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            return {"error": done.stderr[-1500:]}
    return {"best_s": min(times), "all_s": times}


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--name", default="", help="results file suffix and model name")
    parser.add_argument("--llama-simple", type=Path, default=None, help="llama.cpp's llama-simple (CUDA build)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gguf = args.gguf or bundled_gguf()
    model = args.name or "cold-" + gguf.stem.lower().replace(".", "-")
    rows = measure_daemon(gguf, model)
    reference = llama_simple_s(args.llama_simple, gguf, args.runs) if args.llama_simple else None
    print_table(["case", "first token s", "phases (s)"],
                [[r["case"], f"{r['first_token_s']:.2f}",
                  " ".join(f"{k}={v:.2f}" for k, v in r["load_phases_s"].items())] for r in rows])
    if reference:
        print(f"llama.cpp llama-simple (load + 1 token, whole process): {reference}")
    path = write_result("cold_start" + (f"_{args.name}" if args.name else ""),
                        {"gguf": gguf.name, "file_bytes": gguf.stat().st_size, "cases": rows,
                         "llama_cpp_load_and_first_token": reference})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
