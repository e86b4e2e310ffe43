"""Pulls the daemon runs: each on its own thread, its progress crossing to the event loop
for the HTTP stream and to the event hub for the dashboard and tray ("pull" events).

A pull whose client goes away is cancelled (as Ollama cancels one): the download
stops at its next chunk and leaves no partial file. The registry is scanned again
before "success" is told, so the model is listed by then.
"""
from __future__ import annotations

import asyncio
import threading

from app.models.events import EventHub
from app.pull.hub import PullConfig, PullResult, pull
from app.pull.names import PullRef
from app.pull.progress import PullProgress

_END = object()


class PullJob:
    def __init__(self, ref: PullRef, config: PullConfig, hub: EventHub, registry) -> None:
        self.ref, self.config, self.hub, self.registry = ref, config, hub, registry
        self.cancel_event = threading.Event()
        self.result: PullResult | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._run, name=f"pull-{ref.repo_id}", daemon=True).start()

    def _sink(self, progress: PullProgress) -> None:
        if progress.status == "success":  # listed before anyone hears of it
            self.registry.refresh()
        self.hub.publish("pull", model=self.ref.name, **progress.to_json())
        self._loop.call_soon_threadsafe(self._queue.put_nowait, progress)

    def _run(self) -> None:
        try:
            self.result = pull(self.ref, self.config, self._sink, self.cancel_event)
        except BaseException as exc:  # handed to the loop, raised where the stream is read
            self.hub.publish("pull", model=self.ref.name, status="failed", error=str(exc))
            self._loop.call_soon_threadsafe(self._queue.put_nowait, exc)
        finally:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    async def next(self) -> PullProgress | None:
        """The next progress step, None at the end; re-raises what the pull raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancel_event.set()
