"""A tiny random-weight GGUF served by the torch engine on the CPU, its KV (and weights,
where asked) in kvcached host-backend pages: the model the memory-rung tests drive."""
from __future__ import annotations

from pathlib import Path

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.torch.engine import TorchEngine
from engines.types import GenerateRequest, RequestKind, SamplingParams
from kvcached.config import KvcachedConfig
from kvcached.standalone import standalone_pool
from tiny_gguf import TINY, random_state, write_tiny_gguf

PAGE = 64 << 10


def write_tiny(path: Path) -> Path:
    write_tiny_gguf(path, TINY, random_state(TINY))
    return path


def tiny_engine(path: Path, **config) -> TorchEngine:
    """Loaded; `config`: EngineConfig fields over two slots of 256 tokens, float32 numerics."""
    values = dict(torch_num_slots=2, torch_max_context=256, torch_prefill_chunk=64, torch_llamacpp_numerics=False)
    engine = TorchEngine(ModelInfo(name="tiny", path=str(path)), EngineConfig(**{**values, **config}),
                         standalone_pool(KvcachedConfig(page_size=PAGE, reserve_pages=0)))
    engine.load()
    return engine


def ask(engine: TorchEngine, prompt: str, max_tokens: int = 8):
    """(text, usage) of a greedy completion."""
    request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                              sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    chunks = list(engine.generate(request))
    return "".join(c.text for c in chunks), chunks[-1].usage
