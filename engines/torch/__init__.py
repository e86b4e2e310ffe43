"""engines.torch: a native PyTorch engine for the Llama family.

The model and its loaders (configs, gguf_loader, safetensors_loader,
synthetic, model, attention) are plain building blocks; the serving side
(scheduler, sampling, batching, TorchEngine) sits on top of them. Importing
this package imports nothing heavy: import the submodule you need.
"""
