"""engines: model runtimes behind one interface (engines.base.Engine).

`engines.torch` runs Llama-family models with their KV cache in kvcached
virtual tensors; `engines.llamacpp` runs GGUF models through llama-cpp-python
and answers the broker per model. engines imports kvcached, never app.
"""
