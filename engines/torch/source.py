"""A torch engine's model source (a GGUF file, a safetensors folder, random weights of a
named config): read it, or say from its metadata what reading it will hold."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from engines.base import ModelInfo
from engines.errors import ModelLoadError
from engines.torch.serve.text_side import TextSide


def read_model(info: ModelInfo, device: torch.device, dtype: torch.dtype | None, progress,
               llamacpp_numerics: bool) -> tuple[torch.nn.Module, TextSide | None]:
    """(the model on device, its text side; None for a safetensors folder, which has none here)."""
    if info.source == "synthetic" or not info.path:
        from engines.registry.synthetic import tokenizer_meta
        from engines.torch.model.synthetic import synthetic_model

        model = synthetic_model(info.metadata.get("config", info.name), device, dtype)
        # A byte-level vocabulary that needs no file: benchmarks send text and read text.
        meta = tokenizer_meta(model.cfg.vocab_size)
        return model, TextSide.from_gguf(meta, "")  # no end token: runs the full length
    path = Path(info.path)
    if path.is_dir():
        from engines.torch.load.safetensors_loader import load_safetensors

        return load_safetensors(path, device, dtype, progress), None
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    from engines.torch.load.gguf_loader import load_gguf

    # The tokenizer is built from the metadata while the weights are read and uploaded: a
    # 128k-token vocabulary took ~0.5-1 s, which the load paid after the weights before.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
        text: list[Future] = []
        on_metadata = lambda meta, cfg: text.append(pool.submit(TextSide.from_gguf, meta, str(path), cfg.eos_ids))  # noqa: E731
        model, _ = load_gguf(path, device, dtype, progress, llamacpp_numerics=llamacpp_numerics,
                             on_metadata=on_metadata)
        return model, text[0].result()


def weights_estimate(info: ModelInfo, device: torch.device, dtype: torch.dtype | None) -> int:
    """What read_model's weights will hold, before reading (the broker admits a load against
    it: engines.broker_client.admitted_load). A GGUF's blocks stay blocks on the GPU (the
    file's size); elsewhere (the CPU, safetensors, random weights) every weight is a float
    of `dtype`, or the device's default. KV pages come later, each admitted as tokens arrive."""
    from engines.torch.load.gguf_loader import default_dtype

    if (device.type == "cuda" and info.path.endswith(".gguf")) or not info.parameter_count:
        return info.size_bytes
    return info.parameter_count * (dtype or default_dtype(device)).itemsize
