"""The context a model is (or will be) served with, as /api/show, /v1/models and /api/ps report it.

A loaded model reports its engine's own (llama.cpp's n_ctx, the torch
engine's max_ctx: a num_ctx may have grown it). One not loaded yet reports
what the engine will choose: the per-model `context_length` setting, else the
trained length bounded as engines/context.py says, with the same inputs the
engines get (the `max_context` setting, the broker's budget).
"""
from __future__ import annotations

from app.server.context import ServerContext
from engines.base import ModelInfo
from engines.broker_client import load_estimate
from engines.context import served_context


def served_context_of(info: ModelInfo, settings=None) -> int:
    override = settings.model(info.name).context_length if settings is not None else None
    if override:
        return min(override, info.context_length or override)
    max_context = getattr(settings, "max_context", 32768)
    budget = int(getattr(settings, "budget_bytes", 0) or 0) or None
    return served_context(info.context_length, max_context, load_estimate(info, 1) - info.size_bytes, budget)


def served_ctx_of(ctx: ServerContext, info: ModelInfo) -> int:
    loaded = ctx.manager.find_loaded(info.name)
    if loaded is not None:
        engine = loaded.engine
        served = getattr(engine, "n_ctx", 0) or getattr(engine, "max_ctx", 0)
        if served:
            return int(served)
    return served_context_of(info, ctx.settings)
