"""benchmarks/quant_decode.py's bandwidth limit: a token's step reads every weight but, of
stacked experts, only the k of E it is routed to (Qwen3-30B-A3B's 8 of 128)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.quant_decode import weights_read_per_token
from engines.torch.kernels.quant_weight import QuantWeight
from engines.torch.quant.modules import QuantExperts, quant_weights
from tests.engines.quant_blocks import block_bytes


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        raw = torch.from_numpy(block_bytes("Q8_0", 8 * 4, 64, 1).copy())
        self.experts = QuantExperts(QuantWeight.from_gguf(raw, "Q8_0", (32, 64), "cpu"), 8, torch.float32)
        self.norm = nn.Parameter(torch.ones(64))            # 256 bytes every step reads
        self.cfg = SimpleNamespace(num_experts_used=2)

    def weight_bytes(self) -> int:
        return self.norm.numel() * 4 + sum(w.nbytes() for w in quant_weights(self))


def test_only_the_routed_experts_count() -> None:
    model = _Model()
    experts = model.experts.qweight.nbytes()
    assert weights_read_per_token(model) == 256 + experts * 2 // 8
