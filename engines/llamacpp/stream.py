"""The iterator a caller of LlamaCppEngine.generate reads chunks from.

The worker thread puts chunks (or an exception) into a queue; this hands them
out in order and re-raises an exception where it happened. A caller that stops
reading (closes the iterator, or drops it: a client went away) cancels the
request, so the worker stops generating for nobody.
"""
from __future__ import annotations

import queue
from collections.abc import Iterator

from engines.types import GenerateRequest, StreamChunk


class TokenStream(Iterator[StreamChunk]):
    END = object()   # the worker's last item, after the final chunk or an exception

    def __init__(self, request: GenerateRequest, items: queue.Queue) -> None:
        self.request = request
        self._items = items
        self._done = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        item = self._items.get()
        if item is TokenStream.END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        """Stop early: the request is cancelled and its context freed for the next."""
        if not self._done:
            self.request.cancel()
            self._done = True

    def __del__(self) -> None:
        self.close()
