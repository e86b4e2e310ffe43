"""engines.text: text around a model: tokenization identical to llama.cpp's,
chat templates from the model file rendered in a sandbox, and fill-in-the-middle
prompt assembly. Shared by the torch and llama.cpp engines."""
