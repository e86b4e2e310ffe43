"""A registry source of synthetic models: random weights from a named config, for benchmarks.

No weights can be downloaded on the benchmark machines, and serving speed and
memory depend on shapes and bytes, not on values. So benchmarks ask the
daemon for `synthetic/llama-3.1-8b` (or any config in
engines.torch.model.configs.NAMED_CONFIGS) and the torch engine builds it with
random weights (ModelInfo.source "synthetic", path "", metadata["config"]
naming the config). Colocation needs several models of one shape, so a name
may carry a copy tag: `synthetic/llama-3.1-8b:b` is a second, separate model
of the same config. The source is off unless the daemon's settings turn it
on: a user's model list never shows random-weight models.

Names are parsed, never turned into paths, and only configs in the table
resolve, so no name can reach a file.

Random weights come with no tokenizer, and the benchmark machines have no
tokenizer files either, so `tokenizer_meta` describes one in GGUF terms: a
byte-level BPE with no merges (one token per byte of text) whose other ids
decode to " w<id>", so every generated token streams visible text and TTFT
is measured on the first token. It has no end-of-generation token: a
synthetic model always generates max_tokens.
"""
from __future__ import annotations

from collections.abc import Iterable

from engines.base import ModelInfo
from engines.errors import ModelLoadError, ModelNotFound
from engines.torch.model.configs import NAMED_CONFIGS, ModelConfig

PREFIX = "synthetic/"
SOURCE = "synthetic"
DEFAULT_COPIES = ("a", "b", "c")
DTYPE_BYTES = 2   # bf16/fp16 weights: what the torch engine builds on a GPU


def parse_name(name: str) -> tuple[str, str]:
    """'synthetic/llama-3.1-8b:b' -> ('llama-3.1-8b', 'b'); ModelNotFound for anything else."""
    if not name.startswith(PREFIX):
        raise ModelNotFound(f"{name!r} is not a synthetic model name (they start with {PREFIX!r})",
                            name=name, near=())
    config, _, tag = name[len(PREFIX):].partition(":")
    if config not in NAMED_CONFIGS:
        known = tuple(PREFIX + c for c in sorted(NAMED_CONFIGS))
        raise ModelNotFound(f"no synthetic config {config!r}; known: {', '.join(known)}",
                            name=name, near=known)
    return config, tag


def synthetic_info(name: str) -> ModelInfo:
    """The ModelInfo of one synthetic model name (with or without a copy tag)."""
    config, _ = parse_name(name)
    cfg: ModelConfig = NAMED_CONFIGS[config]
    return ModelInfo(
        name=name, path="", family=cfg.arch, parameter_count=cfg.num_params,
        quantization="BF16", context_length=cfg.max_context, can_infill=False,
        size_bytes=cfg.num_params * DTYPE_BYTES, source=SOURCE,
        metadata={"config": config, "block_count": cfg.num_layers, "embedding_length": cfg.dim,
                  "head_count": cfg.num_heads, "head_count_kv": cfg.num_kv_heads,
                  "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                  "kv_bytes_per_token": cfg.kv_bytes_per_token(DTYPE_BYTES)},
    )


def synthetic_names(configs: Iterable[str] | None = None,
                    copies: Iterable[str] = DEFAULT_COPIES) -> list[str]:
    """Every name the source lists: each config bare, then each copy tag of it."""
    names: list[str] = []
    for config in (sorted(NAMED_CONFIGS) if configs is None else configs):
        parse_name(PREFIX + config)  # refuse unknown configs early, with the known list
        names.append(PREFIX + config)
        names.extend(f"{PREFIX}{config}:{tag}" for tag in copies)
    return names


def scan_synthetic(configs: Iterable[str] | None = None,
                   copies: Iterable[str] = DEFAULT_COPIES) -> list[ModelInfo]:
    """The listing of the synthetic source, as the registry merges it."""
    return [synthetic_info(name) for name in synthetic_names(configs, copies)]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-character table: the 256 single-byte tokens of a byte-level BPE
    (printable bytes stand for themselves, the others for chr(256 + n), space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return [chars[b] for b in range(256)]


def tokenizer_meta(vocab_size: int) -> dict:
    """GGUF tokenizer metadata for a synthetic model of vocab_size ids (see the module doc);
    engines.text.tokenizer.load_tokenizer builds it without any file."""
    if vocab_size < 256:
        raise ModelLoadError(f"a synthetic vocabulary needs at least 256 ids, not {vocab_size}")
    tokens = _byte_tokens() + [f"\u0120w{i}" for i in range(256, vocab_size)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.token_type": [1] * vocab_size, "tokenizer.ggml.add_bos_token": False}
