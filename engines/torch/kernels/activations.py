"""The activations a model names (ModelConfig.activation) as torch functions, in one place.

Here, below the model, because both sides need the same table: the model's MLPs and
experts (engines.torch.model.mlp, moe) and the kernels' torch fallbacks for a gated
activation (quant_ops.gated_activation), which may not import the model.
gelu_tanh is ggml_gelu and HF's gelu_pytorch_tanh (GeGLU: Gemma)."""
from __future__ import annotations

import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
