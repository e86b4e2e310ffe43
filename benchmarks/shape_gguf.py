"""Random-weight GGUFs of real shapes, quantized by llama.cpp's own quantizer (issue 16).

No weights can be downloaded here or on the GPU machine, and speed depends on
shapes and bytes, not values. This writes a named config
(engines.torch.model.configs: llama-3.1-8b, qwen2.5-7b, qwen2.5-coder-1.5b,
smollm2-135m) as an F16 GGUF with the `gguf` writer (engines.torch.load.
gguf_writer: llama.cpp's names, metadata and row order), then quantizes it with
llama.cpp to Q4_K_M, Q8_0, Q4_0, so the torch engine and llama.cpp read the very
same file. The quantizer is either llama-cpp-python's `llama_model_quantize`
(here) or a `llama-quantize` binary (the GPU machine, where
benchmarks/quant_decode.py builds llama.cpp): `--quantize-bin`.

Weights are N(0, 0.02) (norms 1, biases N(0, 0.002)), drawn on the GPU where
there is one (an 8B model's 8 G values in seconds, not minutes of numpy). Files
already there are kept (a rerun on a warm machine costs nothing).

    python -m benchmarks.shape_gguf --models smollm2-135m --types Q4_K_M,Q8_0 --out build/shapes
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

import gguf  # noqa: E402

from benchmarks.llama_prebuilt import tool_env  # noqa: E402
from engines.torch.load.dequant import FP16_FIELDS, TORCH_DEQUANT  # noqa: E402
from engines.torch.load.gguf_writer import gguf_tensor_name, model_shapes, write_gguf, write_metadata  # noqa: E402
from engines.torch.model.configs import ModelConfig, named_config  # noqa: E402

log = logging.getLogger("benchmarks.shape_gguf")
# llama.cpp's llama_ftype numbers, and the names llama-quantize takes
FTYPES: dict[str, int] = {"Q4_K_M": 15, "Q8_0": 7, "Q4_0": 2, "Q6_K": 18, "Q5_K_M": 17}
DEFAULT_MODELS = ("llama-3.1-8b", "qwen2.5-7b", "qwen2.5-coder-1.5b", "smollm2-135m")
DEFAULT_TYPES = ("Q4_K_M", "Q8_0", "Q4_0")


def _sampler(seed: int):
    """make(name, shape) -> float32 array: torch on CUDA when present, else numpy."""
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(seed)

        def draw(shape: tuple[int, ...], std: float) -> np.ndarray:
            return (torch.randn(shape, generator=gen, device=device) * std).cpu().numpy()
    except ImportError:
        rng = np.random.default_rng(seed)

        def draw(shape: tuple[int, ...], std: float) -> np.ndarray:
            return (rng.standard_normal(shape, dtype=np.float32) * std)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape, dtype=np.float32)
        return draw(shape, 0.002 if name.endswith(".bias") else 0.02)

    return make


def _write_once(path: Path, write, what: str) -> Path:
    """write(partial) unless path exists; renamed into place only once whole."""
    if path.exists():
        log.info("%s exists: kept", path)
        return path
    t = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    write(partial)
    partial.rename(path)
    log.info("wrote %s (%.2f GB%s) in %.0f s", path, path.stat().st_size / 1e9, what, time.perf_counter() - t)
    return path


def write_shape(cfg: ModelConfig, path: Path, seed: int = 0) -> Path:
    """cfg as an F16 GGUF with random weights (kept if path exists)."""
    return _write_once(path, lambda partial: write_gguf(partial, cfg, {}, model_shapes(cfg), _sampler(seed),
                                                          float16=True), "")


def q4_k_m_type(name: str, cfg: ModelConfig, columns: int) -> str:
    """llama.cpp's Q4_K_M choice for a 2-D tensor (llama_tensor_get_type, simplified): Q6_K
    for the head and for attn_v/ffn_down in its use_more_bits layers, Q4_K elsewhere; rows
    that are not whole super-blocks fall back as llama.cpp's do (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    chosen = "Q4_K"
    if name == "lm_head.weight":
        chosen = "Q6_K"
    elif name.endswith(("v_proj.weight", "down_proj.weight")):
        layer, n = int(name.split(".")[2]), cfg.num_layers
        if layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2:
            chosen = "Q6_K"
    if columns % 256:
        chosen = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[chosen]
    return chosen


def legacy_type(recipe: str, name: str, cfg: ModelConfig, columns: int) -> str:
    """llama.cpp's choice in a Q8_0 or Q4_0 file: every 2-D weight of the recipe's type, but in
    Q4_0 the output head (the embedding where it is tied), which its quantizer writes as Q6_K
    (Q8_0 where rows are not whole super-blocks)."""
    is_head = name == "lm_head.weight" or (cfg.tie_embeddings and name == "model.embed_tokens.weight")
    if recipe == "Q4_0" and is_head:
        return "Q6_K" if columns % 256 == 0 else "Q8_0"
    return recipe


BLOCK_RECIPES = ("Q4_K_M", "Q8_0", "Q4_0")   # the file types written as random blocks


def _block_type(name: str, cfg: ModelConfig, shape: tuple[int, ...], recipe: str = "Q4_K_M") -> str:
    """The recipe's type for a weight (stacked experts too), F32 for vectors and for the MoE
    router, which llama.cpp's quantizer never quantizes."""
    if len(shape) < 2 or name.endswith("mlp.gate.weight"):
        return "F32"
    if recipe == "Q4_K_M":
        return q4_k_m_type(name, cfg, shape[-1])
    return legacy_type(recipe, name, cfg, shape[-1])


def _random_blocks(type_name: str, shape: tuple[int, int], gen) -> np.ndarray:
    """uint8 [rows, row_bytes]: random quants, fp16 scales small and finite (drawn on the GPU)."""
    import torch

    block, size, _ = TORCH_DEQUANT[type_name]
    blocks = shape[0] * shape[1] // block
    raw = torch.randint(0, 256, (blocks, size), dtype=torch.uint8, generator=gen, device=gen.device)
    for offset in FP16_FIELDS[type_name]:
        scale = torch.empty(blocks, device=gen.device).uniform_(0.002, 0.02, generator=gen).half()
        raw[:, offset:offset + 2] = scale.view(torch.uint8).reshape(-1, 2)
    return raw.reshape(shape[0], -1).cpu().numpy()


BLOCK_SHAPES = _ROOT / "build" / "quant" / "blocks"   # named shapes as random Q4_K_M blocks, kept between runs


def named_block_shape(name: str, recipe: str = "Q4_K_M") -> Path:
    """The named config (llama-3.1-8b, smollm2-135m...) as random blocks of a recipe
    (BLOCK_RECIPES) under BLOCK_SHAPES, written on first use (write_block_shape)."""
    return write_block_shape(named_config(name), BLOCK_SHAPES / f"{name}.{recipe}.gguf", recipe=recipe)


def write_block_shape(cfg: ModelConfig, path: Path, seed: int = 0, recipe: str = "Q4_K_M") -> Path:
    """cfg as a GGUF of random blocks typed as llama.cpp's quantizer types a file of `recipe`
    (Q4_K_M, Q8_0, Q4_0), written straight (no F16 file, no quantizer): for files too big to
    quantize in a call. The types and bytes are that file's; the values are not."""
    if recipe not in BLOCK_RECIPES:
        raise ValueError(f"random blocks: {recipe!r} is not one of {', '.join(BLOCK_RECIPES)}")
    return _write_once(path, lambda partial: _write_blocks(cfg, partial, seed, recipe), f" of random {recipe} blocks")


def _write_blocks(cfg: ModelConfig, path: Path, seed: int, recipe: str) -> None:
    import torch

    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    shapes, make = model_shapes(cfg), _sampler(seed)
    w = gguf.GGUFWriter(str(path), cfg.arch)
    write_metadata(w, cfg, {})
    types = {name: _block_type(name, cfg, shape, recipe) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        if types[name] == "F32":
            w.add_tensor_info(gguf_tensor_name(name, cfg.arch), shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            block, size, _ = TORCH_DEQUANT[types[name]]
            row_bytes = shape[-1] // block * size       # stacked experts: [E, out, row_bytes]
            w.add_tensor_info(gguf_tensor_name(name, cfg.arch), (*shape[:-1], row_bytes), np.dtype(np.uint8),
                              int(np.prod(shape[:-1])) * row_bytes, raw_dtype=gguf.GGMLQuantizationType[types[name]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes.items():
        w.write_tensor_data(np.asarray(make(name, shape), dtype=np.float32) if types[name] == "F32"
                            else _random_blocks(types[name], (int(np.prod(shape[:-1])), shape[-1]), gen))
    w.close()


def quantize(source: Path, dest: Path, type_name: str, quantize_bin: str | None = None,
             threads: int = 0, allow_requantize: bool = False) -> Path:
    """llama.cpp's quantizer: the binary where given, else llama-cpp-python (kept if dest exists)."""
    if dest.exists():
        log.info("%s exists: kept", dest)
        return dest
    partial = dest.with_suffix(".partial")
    t = time.perf_counter()
    if quantize_bin:
        cmd = [quantize_bin] + (["--allow-requantize"] if allow_requantize else []) + \
              [str(source), str(partial), type_name] + ([str(threads)] if threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(quantize_bin))
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    else:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = FTYPES[type_name], allow_requantize
        if threads:
            params.nthread = threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama_model_quantize {source} -> {type_name} failed")
    partial.rename(dest)
    log.info("quantized %s -> %s (%.2f GB) in %.0f s", source.name, dest.name, dest.stat().st_size / 1e9,
             time.perf_counter() - t)
    return dest


def shape_paths(out: Path, model: str, types: list[str]) -> tuple[Path, dict[str, Path]]:
    """Where the F16 file and each quantized file of `model` go."""
    return out / f"{model}.F16.gguf", {t: out / f"{model}.{t}.gguf" for t in types}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help=f"of {', '.join(FTYPES)}")
    parser.add_argument("--out", type=Path, default=_ROOT / "build" / "shapes")
    parser.add_argument("--quantize-bin", default=None, help="a llama-quantize binary (else llama-cpp-python)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    for model in args.models.split(","):
        source, quantized = shape_paths(args.out, model, types)
        write_shape(named_config(model), source)
        for type_name, dest in quantized.items():
            quantize(source, dest, type_name, args.quantize_bin, args.threads)
            print(dest)


if __name__ == "__main__":
    main()
