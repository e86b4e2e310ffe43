"""The torch engine's memory: what it reports, and the broker's verbs on it.

A mixin of `TorchEngine` (engine.py), kept apart because it is one concept: how a
loaded model gives memory back and takes it again, rung by rung (trim, drop
prefixes, pause, weights to host, and the host's own relief), each between two
steps of the serving loop (`between_steps`). It reads the engine's state:
`loop`, `store`, `model`, `budget`, `weights`, `config`, `info`, `_lock`, `_state`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from engines.types import MemoryReport, ModelState
from kvcached.errors import KVFileRejected

log = logging.getLogger(__name__)


class MemoryVerbs:
    def memory(self) -> MemoryReport:
        model, store = self.model, self.store
        if model is None or store is None:
            return MemoryReport()
        held, budget, weights = store.held_bytes, self.budget, self.weights
        away = weights.host_bytes if weights is not None else 0
        staging = store.cache.staging_bytes() + (weights.arena.staging_bytes if weights is not None else 0)
        return MemoryReport(weights_bytes=0 if away else model.weight_bytes(), weights_host_bytes=away,
                            kv_held_bytes=held,
                            kv_live_bytes=store.live_bytes, paused_host_bytes=store.paused_bytes,
                            paused_disk_bytes=store.cache.paused_disk_bytes(), staging_host_bytes=staging,
                            on_gpu=model.device.type == "cuda",
                            kv_booked_bytes=budget.booked_bytes(held) if budget else 0,
                            kv_cached_bytes=budget.cached_bytes() if budget else None)

    def trim(self) -> int:
        loop = self.loop
        if loop is None:
            return 0
        with loop.between_steps():
            freed = self.store.trim()
            self._after_reclaim()
            return freed

    def drop_prefixes(self) -> int:
        loop = self.loop
        if loop is None:
            return 0
        with loop.between_steps():
            for slot in loop.scheduler.prefix_cache.drop_all():
                self.store.release(slot)
            freed = self.store.trim()
            self._after_reclaim()
            return freed

    def _give_back_failed(self, slots: list[int]) -> None:
        """After a step that failed for want of memory: the failed sequences' slots hold
        nothing worth keeping; their pages go back (the worker calls this between steps)."""
        loop = self.loop
        if loop is None:
            return
        with loop.between_steps():
            for slot in slots:
                self.store.release(slot)
            if self._state is ModelState.LOADED:
                self.store.trim()
                self._after_reclaim()

    def _after_reclaim(self) -> None:
        self.budget.after_reclaim()   # paused, it keeps what the pause left (after_pause)

    def pause(self) -> int:
        with self._lock:
            if self._state is not ModelState.LOADED:
                return 0
            with self.loop.between_steps():
                freed = self.store.pause()
                self._state = ModelState.PAUSED
                self.budget.after_pause()
                return freed

    def relieve_host(self) -> int:
        """The host is short of memory: paused KV to a file under kv_disk_dir (read back at
        resume), and the host buffers kept for the next pause or step aside freed. A model
        whose weights wait in host memory (weights_to_host) is unloaded: those are the most
        host memory it holds, and the file has them (the next request loads it again)."""
        with self._lock:
            if self.loop is None:
                return 0
            with self.loop.between_steps():
                cache, weights, folder = self.store.cache, self.weights, self.config.kv_disk_dir
                freed = cache.spill(Path(folder) / "spill") if folder else 0
                freed += cache.release_staging()
                if weights is None or not weights.away:
                    return freed + (weights.arena.release_staging() if weights is not None else 0)
                freed += weights.arena.staging_bytes
            self.unload()   # outside between_steps: an unload waits for the worker to stop
            log.info("%s: unloaded, its weights' host copy given back to a host short of memory",
                     self.info.name)
            return freed

    def weights_to_host(self) -> int:
        """Pause (KV to host), then the weights too (engines/torch/weights_rung.py); bytes."""
        with self._lock:
            if self.weights is None or self._state not in (ModelState.LOADED, ModelState.PAUSED):
                return 0
            freed = self.pause()
            if self._state is not ModelState.PAUSED:
                return freed
            with self.loop.between_steps():
                return freed + self.weights.step_aside()

    def _weights_back(self) -> None:
        """The weights on the device again (between steps). An embedding needs no KV: it
        brings back the weights alone, and the next generation the rest."""
        if self.weights is not None and self.weights.away:
            self.weights.bring_back()

    def resume(self) -> None:
        with self._lock:
            self._resume_if_paused()

    def _resume_if_paused(self) -> None:
        if self._state is ModelState.PAUSED:
            with self.loop.step_lock:
                need = self.budget.resume_need()   # weights away included
                self._weights_back()
                self._resume_kv()
                self._state = ModelState.LOADED
                self.budget.after_resume(need)   # the worker asked for `need` before this step

    def _resume_kv(self) -> None:
        try:
            self.store.resume()
        except KVFileRejected as exc:   # a spilled KV that came back damaged: never read into the model
            log.warning("%s: paused conversations lost (%s); they are computed again", self.info.name, exc)
            for slot in self.loop.scheduler.prefix_cache.drop_all():
                self.store.release(slot)

