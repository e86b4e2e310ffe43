"""The daemon's HTTP endpoint: OpenAI, Ollama and llama.cpp dialects over one request type
(engines.types), a Prometheus /metrics, the token-guarded control API, and the dashboard.

app_factory.create_app(ctx) builds it; app/daemon.py runs it under uvicorn. Routes are
thin adapters; errors.py is the one place exceptions become HTTP statuses; security.py
keeps web pages out (Host, Origin, body size); auth.py documents the control token.
"""
