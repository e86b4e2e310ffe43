"""Triton kernels the model runs on CUDA (each checks itself against a torch reference)."""
