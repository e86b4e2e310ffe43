"""The CPU path bit for bit as llama.cpp computes it: quantized dot products,
RMSNorm, RoPE and attention over an fp16 cache (`numerics.install`)."""
