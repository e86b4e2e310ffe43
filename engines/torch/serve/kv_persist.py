"""A torch engine's cached conversations kept across unloads and daemon restarts.

Opt-in per model (`keep_kv_on_disk` in its settings table). At unload (the
daemon's shutdown unloads every model) each idle slot's cached prefix (the KV
of a conversation's tokens so far, what the next turn reuses instead of reading
the prompt again) is written to the KV disk tier (kvcached/kv_cache/disk_tier.py),
paused or not. At the next load of the same file the newest of them go back into
empty slots and the prefix cache, so the conversation's next turn computes only
its new tokens. The identity written with each file (the model file's path,
size and modification time, and the KV's shape and dtype) keeps another model's,
or the same name's after the file changed, from ever being loaded.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from engines.torch.serve.kv_access import KvcachedStore
from engines.torch.serve.prefix_cache import PrefixCache
from kvcached.kv_cache.disk_tier import DiskTier
from kvcached.kv_cache.layout import dtype_name

log = logging.getLogger(__name__)


def where_kept(config, info, act, identity_of) -> None:
    """act(tier, identity) where this model keeps its cached conversations on disk
    (config: EngineConfig, info: ModelInfo; opt-in per model); a failure there is logged,
    never raised: losing a cache must not fail a load or an unload."""
    if not (config.kv_disk_dir and info.name in config.kv_disk_models and info.path):
        return
    try:
        act(DiskTier(Path(config.kv_disk_dir), config.kv_disk_max_bytes), identity_of(info.path))
    except Exception:
        log.exception("%s: cached conversations on disk: skipped", info.name)


def identity(model_path: str, store: KvcachedStore) -> dict:
    stat = Path(model_path).stat()
    shape = store.layout.shape
    return {"model": f"{Path(model_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}",
            "kv": [shape.num_layers, shape.num_kv_heads, shape.head_dim, dtype_name(shape.dtype)]}


def _name(ident: dict, tokens: list[int]) -> str:
    text = f"{ident['model']}|{','.join(map(str, tokens))}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def save(store: KvcachedStore, prefixes: PrefixCache, tier: DiskTier, ident: dict) -> int:
    """Write every idle slot's cached prefix; returns how many were kept. One whose
    sliding window moved past keys its next turn reads serves no one: not written."""
    kept = 0
    for slot, state in enumerate(prefixes.slots):
        if state.is_running or not state.tokens or not store.can_resume_at(slot, len(state.tokens)):
            continue
        kv = store.export_slot(slot, len(state.tokens))
        kept += tier.put(_name(ident, state.tokens), ident, state.tokens, kv,
                         window_floor=store.window_floor(slot)) is not None
    if kept:
        log.info("kept %d cached conversation(s) on disk in %s", kept, tier.folder)
    return kept


def restore(store: KvcachedStore, prefixes: PrefixCache, tier: DiskTier, ident: dict) -> int:
    """Fill empty slots with this model's saved prefixes, newest first; returns how many."""
    empty = [i for i, s in enumerate(prefixes.slots) if not s.is_running and not s.tokens]
    restored = 0
    for slot, saved in zip(empty, tier.take(ident, limit=len(empty))):
        if len(saved.tokens) > store.layout.max_context:
            log.info("a saved conversation of %d tokens exceeds the served context: dropped", len(saved.tokens))
            continue
        store.import_slot(slot, saved.kv, saved.window_floor)
        prefixes.hold(slot, saved.tokens)
        restored += 1
    if restored:
        log.info("restored %d cached conversation(s) from %s", restored, tier.folder)
    return restored
