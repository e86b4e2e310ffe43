"""Loaders: GGUF (with GPU dequantization) and safetensors folders into the model."""
