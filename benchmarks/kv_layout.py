"""Granularity of the KV layout: bytes mapped per byte of live KV.

For the SmolLM2-135M shape (30 layers, 3 KV heads x 64, fp16) and the
Llama-3.1-8B shape (32 layers, 8 x 128, bf16), at 1, 100, 1,000 and 8,000
tokens of one sequence, with 2 MiB pages: a real KVCache maps the pages
(host backend here, the same arithmetic as on the GPU) and we read back what
it holds; the layer-major alternative (one K and one V region per layer) is
computed beside it for comparison.

    PYTHONPATH=. python3 benchmarks/kv_layout.py [--backend host|cuda]
"""
from __future__ import annotations

import argparse
import logging

from benchmarks.results_io import print_table, write_result
from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVShape, layer_major_pages
from kvcached.kv_cache.manager import KVCache
from kvcached.vmm import open_backend

MiB = 1 << 20
PAGE = 2 * MiB
MAX_CONTEXT = 8192
TOKENS = (1, 100, 1000, 8000)
SHAPES: dict[str, KVShape] = {
    "SmolLM2-135M": KVShape(30, 3, 64, "float16"),
    "Llama-3.1-8B": KVShape(32, 8, 128, "bfloat16"),
}


def measure(backend, config: KvcachedConfig, name: str, shape: KVShape) -> list[dict]:
    rows = []
    with KVCache(backend, shape, max_slots=1, max_context=MAX_CONTEXT, config=config) as kv:
        slot = kv.acquire_slot()
        for n in TOKENS:
            kv.ensure(slot, n)
            held, live = kv.held_bytes(), kv.live_bytes()
            layer_major = layer_major_pages(shape, n, PAGE) * PAGE
            rows.append({
                "model": name, "tokens": n, "token_bytes": shape.token_bytes,
                "live_bytes": live, "mapped_bytes": held, "pages": held // PAGE,
                "mapped_per_live": held / live,
                "layer_major_mapped_bytes": layer_major,
                "layer_major_mapped_per_live": layer_major / live,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="host", choices=("host", "cuda", "auto"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = KvcachedConfig(backend=args.backend, page_size=PAGE, reserve_pages=0)
    rows = []
    with open_backend(config) as backend:
        for name, shape in SHAPES.items():
            rows.extend(measure(backend, config, name, shape))
        backend_name = backend.name
    print_table(["model", "tokens", "live MiB", "mapped MiB", "mapped/live", "layer-major/live"],
                [[r["model"], r["tokens"], r["live_bytes"] / MiB, r["mapped_bytes"] / MiB,
                  r["mapped_per_live"], r["layer_major_mapped_per_live"]] for r in rows])
    path = write_result("kv_layout", {
        "backend": backend_name, "page_size": PAGE, "max_context": MAX_CONTEXT,
        "layout": "token-major slot regions [max_context, L, 2, H_kv, D]",
        "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
