"""The physical pages this process holds, against a byte budget.

A small reserve of pre-created pages is kept ready so that mapping a page on
the hot path never waits on page creation (cuMemCreate: 10-15 us per 2 MiB on
an H100); a background thread refills it after each acquire. The driver
calls it makes release the GIL (cuda-python's driver calls run `nogil`;
ctypes drops the GIL around libc calls), so the refill never stalls the
thread that decodes: checked on the H100 by benchmarks/vmm.py's gil_check,
where a spinning thread keeps ~90-120% of its loop turns while another
creates and releases 1 GiB pages back to back. Budget accounting counts every page held: in use plus
in the reserve, since both are real device memory.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kvcached.config import KvcachedConfig
from kvcached.errors import ClosedError, ConfigError, KvcachedError, PoolExhausted
from kvcached.vmm.backend import Handle, VmmBackend

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Page:
    """One physical page of `size` bytes (compared by identity)."""

    handle: Handle
    size: int


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot, in pages and bytes: held == in_use + reserved."""

    page_size: int
    budget_pages: int
    in_use_pages: int
    reserved_pages: int

    @property
    def held_pages(self) -> int:
        return self.in_use_pages + self.reserved_pages

    @property
    def available_pages(self) -> int:
        return max(0, self.budget_pages - self.in_use_pages)


class PagePool:
    """Hands out pages of `config.page_size` up to `config.budget_bytes`. Thread-safe."""

    def __init__(self, backend: VmmBackend, config: KvcachedConfig) -> None:
        self.backend = backend
        self.page_size = config.page_size_for(backend.name)
        unit = max(backend.granularity, backend.zero_page_size)
        if self.page_size % unit:
            raise ConfigError(f"page_size: {self.page_size} is not a multiple of the "
                              f"{backend.name} backend's unit of {unit} bytes")
        budget = config.budget_bytes if config.budget_bytes is not None else backend.total_bytes()
        self._budget_pages = budget // self.page_size
        self._reserve_target = config.reserve_pages
        self._reserve: list[Page] = []
        self._in_use = 0
        self._creating = 0          # pages the refill thread is creating now
        # Filled from the first acquire on; emptied by shrink() and when the last page in use
        # comes back: an idle pool holds no device memory.
        self._refill_wanted = False
        self._closed = False
        self._lock = threading.Lock()  # `with` on a Lock is C; on a Condition, Python
        self._cond = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._refill_loop, name="kvcached-pool-refill",
                                        daemon=True)
        self._thread.start()

    # -- the hot path -----------------------------------------------------
    def acquire(self) -> Page:
        """A page from the reserve, else a new one. PoolExhausted over the budget;
        DeviceOutOfMemory when the device is full."""
        with self._lock:
            while True:
                self._check_open()
                if self._reserve:
                    page = self._reserve.pop()
                    self._in_use += 1
                    self._refill_wanted = True
                    if self._room_to_refill():  # waking the thread for nothing costs GIL turns
                        self._cond.notify_all()
                    return page
                if self._in_use + self._creating < self._budget_pages:
                    break
                if self._creating == 0:
                    raise PoolExhausted(f"page budget of {self._budget_pages} pages of "
                                        f"{self.page_size} bytes is spent")
                self._cond.wait()  # the refill thread's page will land in the reserve
            self._in_use += 1
        try:
            handle = self.backend.create_page(self.page_size)
        except BaseException:
            with self._lock:
                self._in_use -= 1
            raise
        with self._lock:
            self._refill_wanted = True
            self._cond.notify_all()
        return Page(handle, self.page_size)

    def acquire_many(self, n: int) -> list[Page]:
        """`n` pages, all or none: reserve pages under one lock, the rest as acquire()."""
        with self._lock:
            self._check_open()
            k = min(n, len(self._reserve))
            pages = self._reserve[len(self._reserve) - k:]
            del self._reserve[len(self._reserve) - k:]
            self._in_use += k
            if k:
                self._refill_wanted = True
                if self._room_to_refill():
                    self._cond.notify_all()
        try:
            while len(pages) < n:
                pages.append(self.acquire())
        except BaseException:
            self.release_many(pages)
            raise
        return pages

    def release(self, page: Page) -> None:
        """Back to the reserve, or freed when the reserve is full (or over budget), or
        with the whole reserve when it was the last page in use."""
        self.release_many([page])

    def release_many(self, pages: list[Page]) -> None:
        """release() for several pages, under one lock."""
        with self._lock:
            self._in_use -= len(pages)
            if self._in_use == 0:
                # Nothing uses the pool (every model unloaded or empty): the reserve serves no
                # one, and the process goes back to what it held before the first page.
                pages, self._reserve, keep = pages + self._reserve, [], 0
                self._refill_wanted = False
            else:
                room = min(self._reserve_target - len(self._reserve),
                           self._budget_pages - self._in_use - len(self._reserve))
                keep = 0 if self._closed else max(0, min(len(pages), room))
                self._reserve.extend(pages[:keep])
            if self._creating:  # only then can an acquire() be waiting
                self._cond.notify_all()
        for page in pages[keep:]:
            self.backend.release_page(page.handle)

    # -- reclaim and sizing -----------------------------------------------
    def shrink(self) -> int:
        """Free every reserve page (the cheapest reclaim); returns bytes freed.
        The reserve stays empty until the next acquire wants it again."""
        with self._lock:
            pages, self._reserve = self._reserve, []
            self._refill_wanted = False
        for page in pages:
            self.backend.release_page(page.handle)
        return len(pages) * self.page_size

    def fill_reserve(self) -> int:
        """Create reserve pages in this thread until the reserve is full (or the budget
        is); returns pages added. For start-up and benchmarks."""
        added = 0
        while True:
            with self._lock:
                self._check_open()
                if not self._room_to_refill():
                    while self._creating:  # the refill thread's pages count as filled
                        self._cond.wait()
                    if not self._room_to_refill():
                        return added
                    continue
                self._creating += 1
            self._add_created_page(asked=True)
            added += 1

    def set_budget(self, budget_bytes: int) -> None:
        """A new budget; pages already in use are kept, the reserve trims to fit."""
        if budget_bytes < 0:
            raise ConfigError(f"budget_bytes: {budget_bytes} must be >= 0")
        with self._lock:
            self._budget_pages = budget_bytes // self.page_size
            excess = self._in_use + len(self._reserve) - self._budget_pages
            keep = len(self._reserve) - min(len(self._reserve), max(0, excess))
            dropped, self._reserve = self._reserve[keep:], self._reserve[:keep]
        for page in dropped:
            self.backend.release_page(page.handle)

    # -- accounting (bytes) -----------------------------------------------
    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self.page_size, self._budget_pages, self._in_use, len(self._reserve))

    def available(self) -> int:
        """Bytes acquire() can still hand out (reserve pages included)."""
        return self.stats().available_pages * self.page_size

    def held(self) -> int:
        """Bytes of physical pages this pool holds: in use plus reserve."""
        return self.stats().held_pages * self.page_size

    def reserved(self) -> int:
        """Bytes in the reserve: created, unused, freed first by shrink()."""
        return self.stats().reserved_pages * self.page_size

    def budget(self) -> int:
        return self.stats().budget_pages * self.page_size

    # -- life cycle -------------------------------------------------------
    def close(self) -> None:
        """Stop the refill thread and free the reserve. Pages still in use stay
        with their owners, who release them. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.shrink()

    def __enter__(self) -> "PagePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("page pool: used after close()")

    def _room_to_refill(self) -> bool:
        return (len(self._reserve) + self._creating < self._reserve_target
                and self._in_use + len(self._reserve) + self._creating < self._budget_pages)

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or (self._refill_wanted and self._room_to_refill())):
                    self._cond.wait()
                if self._closed:
                    return
                self._creating += 1
            try:
                self._add_created_page()
            except Exception as exc:  # device full: wait for the next acquire to retry
                log_at = log.debug if isinstance(exc, KvcachedError) else log.exception
                log_at("reserve refill stopped: %s", exc)
                with self._lock:
                    self._refill_wanted = False

    def _add_created_page(self, asked: bool = False) -> None:
        """Create one page (counted in _creating by the caller) into the reserve; freed
        instead where the reserve stopped being wanted meanwhile (the last page in use
        came back, or shrink()), unless `asked` for explicitly (fill_reserve)."""
        try:
            handle = self.backend.create_page(self.page_size)
        except BaseException:
            with self._lock:
                self._creating -= 1
                self._cond.notify_all()
            raise
        with self._lock:
            self._creating -= 1
            self._cond.notify_all()
            wanted = asked or self._refill_wanted
            if wanted and not self._closed and len(self._reserve) < self._reserve_target:
                self._reserve.append(Page(handle, self.page_size))
                return
        self.backend.release_page(handle)
