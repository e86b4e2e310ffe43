"""What giving back sliding-window layers' old pages saves: KV bytes held by one
sequence of Gemma-3-12B, Gemma-2-9B and Mistral-7B-with-a-window shapes (KV shapes
only, no weights), with the giveback against without it.

With: a real KVCache (the backend at hand: host RAM here, CUDA where it answers)
grows one slot in prefill chunks of 512 tokens to each length, and we read back
the pages it holds (and, on the host, the RSS it added). Without: the pages the
same slot maps when no layer is marked sliding, `KVLayout.pages_for_tokens`,
the arithmetic `ensure` maps by (a one-part layout; tests/kvcached check it
against real mappings), so the 13 GiB of Gemma-3-12B at 32k tokens need not be
mapped to be counted. A length whose held bytes would pass --max-held is skipped.

    PYTHONPATH=. python3 -m benchmarks.window_kv [--backend host|cuda|auto] [--page-mib 32]
"""
from __future__ import annotations

import argparse
import logging

from benchmarks.results_io import print_table, write_result
from engines.torch.model.configs import named_config, sliding_pattern
from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVLayout, KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.rss import rss_shmem_bytes
from kvcached.vmm import open_backend

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 512   # tokens a step: the engine's default prefill chunk


def gemma3_12b() -> tuple[KVShape, int]:
    cfg = named_config("gemma-3-12b")
    windows = tuple(cfg.window(i) for i in range(cfg.num_layers))
    return KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, "bfloat16", windows), cfg.max_context


# Not among the named configs: their KV shapes from the models' config.json.
SHAPES = {
    "gemma-3-12b": gemma3_12b,
    # Gemma 2 9B: 42 layers, 8 KV heads of 256, every other layer a 4096-token window, 8k context.
    "gemma-2-9b": lambda: (KVShape(42, 8, 256, "bfloat16", sliding_pattern(42, 4096, 2)), 8192),
    # Mistral 7B v0.1: 32 layers, 8 KV heads of 128, every layer a 4096-token window, 32k context.
    "mistral-7b-window": lambda: (KVShape(32, 8, 128, "bfloat16", sliding_pattern(32, 4096, 1)), 32768),
}


def held_with_giveback(backend, config: KvcachedConfig, shape: KVShape, n_tokens: int) -> tuple[int, int, int]:
    """(bytes held, live bytes kept, RSS added) once one slot grew to n_tokens in chunks."""
    rss_before = rss_shmem_bytes()
    with KVCache(backend, shape, max_slots=1, max_context=n_tokens, config=config) as kv:
        slot = kv.acquire_slot()
        for end in range(CHUNK, n_tokens + CHUNK, CHUNK):
            kv.ensure(slot, min(end, n_tokens))
        rss = rss_shmem_bytes() - rss_before if backend.name == "host" else 0
        return kv.held_bytes(), kv.live_bytes(), rss


def without_giveback(shape: KVShape, n_tokens: int, page_size: int) -> int:
    plain = KVShape(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype)
    return KVLayout(plain, 1, n_tokens, page_size).mapped_bytes_for(n_tokens)


def expected_fraction(shape: KVShape, n_tokens: int) -> float:
    """Without pages' slack: the global layers' share plus the sliding ones' window."""
    kept = sum(min(n_tokens, shape.window(i)) if shape.window(i) else n_tokens for i in range(shape.num_layers))
    return kept / (shape.num_layers * n_tokens)


def measure(backend, config: KvcachedConfig, name: str, max_held: int) -> list[dict]:
    shape, max_context = SHAPES[name]()
    page = config.page_size_for(backend.name)
    rows = []
    for n in sorted({8192, 32768, max_context} & set(range(1, max_context + 1))):
        without = without_giveback(shape, n, page)
        if without * expected_fraction(shape, n) > max_held:
            logging.warning("%s at %d tokens: over --max-held, skipped", name, n)
            continue
        held, live, rss = held_with_giveback(backend, config, shape, n)
        rows.append({"model": name, "tokens": n, "layers": shape.num_layers,
                     "sliding_layers": len(shape.sliding_layers),
                     "window": max(shape.windows), "held_bytes": held, "live_bytes": live,
                     "rss_added_bytes": rss, "without_bytes": without,
                     "held_fraction": held / without, "expected_fraction": expected_fraction(shape, n),
                     "saved_bytes": without - held})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=("host", "cuda", "auto"))
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--page-mib", type=int, default=None,
                        help="page size (default: the backend's; 32 on the host shows the GPU's default)")
    parser.add_argument("--max-held", type=float, default=None,
                        help="GiB a run may hold with the giveback (default: 4 on the host, 40 on CUDA)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = KvcachedConfig(backend=args.backend, reserve_pages=0,
                            **({"page_size": args.page_mib * MiB} if args.page_mib else {}))
    rows = []
    with open_backend(config) as backend:
        max_held = (args.max_held or (4 if backend.name == "host" else 40)) * GiB
        for name in args.models.split(","):
            rows.extend(measure(backend, config, name, max_held))
        backend_name, page = backend.name, config.page_size_for(backend.name)
    print_table(["model", "tokens", "without MiB", "held MiB", "held/without", "expected", "RSS added MiB"],
                [[r["model"], r["tokens"], r["without_bytes"] / MiB, r["held_bytes"] / MiB,
                  r["held_fraction"], r["expected_fraction"], r["rss_added_bytes"] / MiB] for r in rows])
    suffix = f"_{page // MiB}mib" if args.page_mib else ""
    path = write_result(f"window_kv_{backend_name}{suffix}", {
        "backend": backend_name, "page_size": page, "chunk_tokens": CHUNK, "dtype": "bfloat16",
        "without": "KVLayout.pages_for_tokens of the same shape with no sliding layers",
        "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
