"""A file's bytes onto the device at copy speed: through two pinned buffers, overlapped.

Why (issue 22, "weights at disk speed"): a quantized GGUF went to the GPU as one
pageable copy per tensor, after two host copies of its rows (numpy's un-permute and
the fused groups' concatenation, then `np.array` off the memory map). A pageable
copy makes the driver stage through its own small pinned buffer, synchronously; an
8B Q4_K_M file (4.9 GB) loaded in 11-14 s on the H100 (quant_decode's `load_s`).

Here each tensor's bytes are read once, from the memory map into one of two pinned
buffers, and copied to the device asynchronously from there, chunk by chunk: while
the DMA of one chunk runs, the host fills the other buffer with the next. Anything
the rows need after (Q/K un-permute, fusing) happens on the device, in its memory.
On the CPU (tests, the host backend) the uploader copies straight into the target.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

CHUNK_BYTES = 64 << 20    # per pinned buffer: big enough that a DMA's fixed cost vanishes


class StagedUpload:
    """Copies numpy arrays (memory maps included) into device tensors; use as a context
    manager, which waits for the last copies and frees the pinned buffers."""

    def __init__(self, device: torch.device | str, chunk_bytes: int = CHUNK_BYTES,
                 staged: bool | None = None) -> None:
        """staged: through the two buffers (default: on CUDA, where they are pinned; the CPU
        tests stage through plain ones, to check the chunking)."""
        self.device = torch.device(device)
        self.bytes_copied = 0
        self._on_cuda = self.device.type == "cuda"
        self._staged = self._on_cuda if staged is None else staged
        self._chunk = chunk_bytes
        self._buffers: list[torch.Tensor] = []
        self._done: list[torch.cuda.Event | None] = []
        self._turn = 0

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def copy(self, source: np.ndarray, target: torch.Tensor) -> None:
        """source's bytes into target (contiguous, as many bytes), in order on the current stream."""
        flat = _as_bytes(source)
        out = target.view(-1).view(torch.uint8)
        if flat.numel() != out.numel():
            raise ValueError(f"{flat.numel()} bytes do not fill a target of {out.numel()}")
        self.bytes_copied += flat.numel()
        if not self._staged:
            out.copy_(flat)
            return
        for start in range(0, flat.numel(), self._chunk):
            stop = min(flat.numel(), start + self._chunk)
            buffer, done = self._next_buffer()
            if done is not None:
                done.synchronize()                      # its previous DMA has left it
            staged = buffer[:stop - start]
            staged.copy_(flat[start:stop])              # the one host-side read of these bytes
            out[start:stop].copy_(staged, non_blocking=self._on_cuda)
            if done is not None:
                done.record()

    def finish(self) -> None:
        """Wait for every copy in flight, then free the pinned buffers."""
        for done in self._done:
            if done is not None:
                done.synchronize()
        pinned = self._on_cuda and bool(self._buffers)
        self._buffers, self._done = [], []
        # torch's host allocator keeps freed pinned blocks for reuse: 128 MiB the process
        # would hold for good after every load. Its free blocks go back (ones in use stay).
        empty_host_cache = getattr(torch._C, "_accelerator_emptyHostCache", None)
        if pinned and empty_host_cache is not None:
            empty_host_cache()

    def _next_buffer(self) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if not self._buffers:
            self._buffers = [torch.empty(self._chunk, dtype=torch.uint8, pin_memory=self._on_cuda)
                             for _ in range(2)]
            self._done = [torch.cuda.Event() if self._on_cuda else None for _ in range(2)]
            for done in self._done:
                if done is not None:
                    done.record()
        self._turn ^= 1
        return self._buffers[self._turn], self._done[self._turn]


def _as_bytes(source: np.ndarray) -> torch.Tensor:
    """A flat uint8 tensor over source's memory, without a copy where it is contiguous (a
    memory map is read-only: torch warns that it cannot write it, and nothing here does)."""
    array = np.ascontiguousarray(source).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
