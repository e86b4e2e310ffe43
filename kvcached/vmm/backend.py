"""The small interface every VMM backend implements (cuda, host).

A backend reserves virtual address ranges, creates physical pages, maps them
into a range and gives them back. Its one invariant: every reserved address
that holds no page is backed by ONE shared read-only zero page, so a stray
read sees zeros and a stray write faults instead of landing somewhere.
Pages, virtual tensors and the pool are built on this; nothing above it
calls a driver.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

Handle = Any  # backend-specific physical page handle (CUDA: int; host: HostHandle)


class VmmBackend(ABC):
    """Reserve, create, map, unmap, release: the whole driver surface kvcached needs."""

    name: str                 # "cuda" | "host"
    granularity: int          # bytes; page sizes and reservations are multiples of it
    zero_page_size: int       # bytes of the shared read-only zero page
    device: torch.device

    @abstractmethod
    def reserve(self, size: int) -> int:
        """Reserve `size` bytes of address space (a multiple of zero_page_size),
        backed everywhere by the read-only zero page. Returns the base address."""

    @abstractmethod
    def free_reservation(self, addr: int, size: int) -> None:
        """Return a whole reservation; its pages must already be unmapped."""

    @abstractmethod
    def create_page(self, size: int) -> Handle:
        """Create one physical page. Raises DeviceOutOfMemory when the device is full."""

    @abstractmethod
    def release_page(self, handle: Handle) -> None:
        """Release a physical page (its memory returns once it is unmapped)."""

    @abstractmethod
    def map_pages(self, addr: int, handles: Sequence[Handle], size: int, bare: bool = False) -> None:
        """Map `handles` (each `size` bytes) at adjacent addresses from `addr`, read/write,
        replacing the zero page there (`bare`: the range has no mapping at all, after
        unmap_pages(restore_zero=False)). All or nothing."""

    @abstractmethod
    def unmap_pages(self, addr: int, count: int, size: int, restore_zero: bool = True) -> None:
        """Unmap `count` adjacent pages of `size` bytes from `addr` and put the zero page
        back (`restore_zero=False`: leave the range bare; map_zero() later). The caller
        synchronizes first (see synchronize())."""

    @abstractmethod
    def map_zero(self, addr: int, size: int) -> None:
        """Map the read-only zero page over a bare range."""

    def map_page(self, addr: int, handle: Handle, size: int) -> None:
        """Map one page read/write at `addr`."""
        self.map_pages(addr, [handle], size)

    def unmap_page(self, addr: int, size: int) -> None:
        """Unmap one page and put the zero page back."""
        self.unmap_pages(addr, 1, size)

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for all device work: unmapping memory a kernel still reads is an
        illegal-address crash (seen in vLLM and kvcached)."""

    @abstractmethod
    def total_bytes(self) -> int:
        """Total memory of the device (host: MemTotal)."""

    @abstractmethod
    def close(self) -> None:
        """Release the zero page and any backend state. Idempotent."""

    def __enter__(self) -> "VmmBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
