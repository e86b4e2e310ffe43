"""engines.llamacpp: GGUF models through llama-cpp-python, obeying the broker per model.

engine.LlamaCppEngine is the entry point. Importing this package imports
nothing native; import engines.llamacpp.engine to use it.
"""
