"""How long a cold model makes its first request wait, and where the time goes (issue 22).

For one GGUF (default: the bundled SmolLM2-135M) served by the torch engine of a
real daemon, three first tokens, each the first request's time to its first
streamed token (the load happens inside it, as a user meets it):

  first_start  a fresh install: empty compiled-kernel cache (engines/compile_cache.py)
  restart      the daemon restarted with the same home: kernels cached on disk
  reload       the model unloaded (control API) and asked for again in the same process

with the engine's load phases (engines/phases.py, from /api/ps) for each (the read phase
also as GB/s of the file, beside the file's read rate from disk and from the page
cache: benchmarks/read_rate.py), and the
seconds the daemon took after /health to open its device (the CUDA libraries and
kernel code: engines.factory.prepare_device), waited for before the request. With
--llama-completion, the reference: llama.cpp's own `llama-completion` (CUDA build, all
layers on the GPU) loading the same file and producing one token, timed as a
whole process, best of --runs (what Ollama pays when it reloads a model).

  python -m benchmarks.cold_start [--gguf FILE] [--llama-completion PATH]
Writes benchmarks/results/cold_start[_<name>].json.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.daemon_proc import Daemon
from benchmarks.e2e_common import base_settings, bundled_gguf, setup_logging
from benchmarks.llama_peer import load_and_first_token_s, start_build
from benchmarks.read_rate import file_read_rates
from benchmarks.results_io import print_table, write_result
from benchmarks.shape_gguf import named_block_shape
from benchmarks.stream_client import TEXTLESS, openai_completion

_ROOT = Path(__file__).resolve().parent.parent
FIRST_TOKEN_TIMEOUT_S = 600.0
PEER_BUILD_WAIT_S = 400.0
# Tokens asked for: the first streamed text is timed. A random-weight GGUF of a named shape
# may answer only tokens that render no text (special tokens, partial bytes): then the
# response's end is timed instead, an upper bound that holds MAX_TOKENS - 1 decode steps
# (milliseconds) more than the first token, and the row says so.
MAX_TOKENS = 4


def first_token_s(daemon: Daemon, model: str) -> tuple[float, bool]:
    """Seconds from sending a completion to its first streamed text, and whether that was
    the response's end instead (no text came: MAX_TOKENS says why)."""
    async def once() -> tuple[float, bool]:
        async with httpx.AsyncClient(timeout=FIRST_TOKEN_TIMEOUT_S, trust_env=False) as client:
            record = await openai_completion(client, daemon.base_url, model, "Hello", MAX_TOKENS, time.monotonic,
                                             tag="cold")
        if record.error == TEXTLESS:
            return record.t_end - record.t_send, True
        if not record.ok:
            raise RuntimeError(f"first request to {model} failed: {record.error}\n{daemon.log_tail()}")
        return record.ttft, False
    return asyncio.run(once())


def first_token_row(daemon: Daemon, model: str, case: str) -> dict:
    seconds, at_end = first_token_s(daemon, model)
    return {"case": case, "first_token_s": seconds, "timed_at_response_end": at_end}


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
                # The device opened first (a daemon starts with the desktop, long before an
                # editor's first request): its cost is reported beside the first token, not in it.
                device_open_s = daemon.wait_for_device()
                rows.append({**first_token_row(daemon, model, case), "device_open_s": device_open_s,
                             "load_phases_s": load_phases(daemon, model)})
                if case == "restart":
                    daemon.control.request("POST", f"/control/models/{model}/unload")
                    rows.append({**first_token_row(daemon, model, "reload"),
                                 "load_phases_s": load_phases(daemon, model)})
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rows


def peer_completion(source_tar: Path):
    """Starts restoring (or building) llama.cpp; returns a callable giving its llama-completion
    once ready, None when the build failed (logged: the run goes on without the reference)."""
    build = start_build(source_tar, _ROOT / "build" / "quant")

    def ready() -> Path | None:
        if build.wait(PEER_BUILD_WAIT_S):
            return Path(build.binary("llama-completion"))
        print(f"llama.cpp build failed; no reference:\n{build.log_tail()}")
        return None
    return ready


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the bundled SmolLM2-135M")
    parser.add_argument("--name", default="", help="results file suffix and model name")
    parser.add_argument("--llama-completion", type=Path, default=None,
                        help="llama.cpp's llama-completion (CUDA build: benchmarks/llama_peer.py)")
    parser.add_argument("--shape", default="", help="a named config written as random Q4_K_M blocks, "
                                                     "instead of --gguf (llama-3.1-8b, qwen2.5-7b...)")
    parser.add_argument("--llama-src", type=Path, default=None,
                        help="llama.cpp's sources (.gpu/llama.cpp-src.tar.xz): the reference's llama-completion")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # The peer restores (or builds) in the background while the file is written and timed.
    completion = peer_completion(args.llama_src) if args.llama_src else (lambda: args.llama_completion)
    gguf = named_block_shape(args.shape) if args.shape else (args.gguf or bundled_gguf())
    model = "cold-" + (args.name or gguf.stem.lower().replace(".", "-").replace("_", "-"))
    rates = file_read_rates(gguf)          # the daemon then reads it from the page cache, as llama.cpp does
    rows = measure_daemon(gguf, model)
    for row in rows:                        # the load's read phase against the file's size
        read_s = row["load_phases_s"].get("read")
        row["read_gb_s"] = gguf.stat().st_size / read_s / 1e9 if read_s else None
    binary = completion()
    reference = load_and_first_token_s(binary, gguf, args.runs) if binary else None
    print_table(["case", "first token s", "device open s", "phases (s)"],
                [[r["case"], f"{r['first_token_s']:.2f}", f"{r.get('device_open_s', 0.0):.2f}",
                  " ".join(f"{k}={v:.2f}" for k, v in r["load_phases_s"].items())] for r in rows])
    if reference:
        print(f"llama.cpp llama-completion (load + 1 token, whole process): {reference}")
    print(f"the file reads at {rates['disk_gb_s']:.2f} GB/s from disk ({'' if rates['dropped'] else 'pages not dropped; '}"
          f"page cache {rates['page_cache_gb_s']:.2f} GB/s); the loads' read phases: "
          + ", ".join(f"{r['case']} {r['read_gb_s']:.2f} GB/s" for r in rows if r.get("read_gb_s")))
    path = write_result("cold_start" + (f"_{args.name}" if args.name else ""),
                        {"gguf": gguf.name, "file_bytes": gguf.stat().st_size, "read_rates": rates, "cases": rows,
                         "llama_cpp_load_and_first_token": reference})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
