"""The remote engine: models of an OpenAI-compatible or Ollama server elsewhere (a vLLM or
SGLang cluster, a LAN box running Ollama or llama-server), listed beside local ones under
a prefix the user chooses and proxied with streaming.

config.py (RemoteConfig, one per [remotes.NAME] table), listing.py (the remote's models as
ModelInfo, source "remote"), dialects.py (request bodies and stream parsing per API kind),
engine.py (RemoteEngine: the Engine interface over HTTP, errors mapped, timeouts).
"""
