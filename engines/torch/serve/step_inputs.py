"""`StepInputs`: the fixed-address tokens, positions and slots a captured decode step reads,
and how the host's values for each step reach them.

The host fills a pinned buffer in place (no tensor built per step: building one from the
lists and copying it cost ~25 us a SmolLM2 step). `direct` (READ_PINNED_IN_GRAPH, the
default): where the GPU's kernels can read pinned memory (decided once a device by a probe),
the graph's first kernel reads it where it lies (kernels/step_inputs.py: no DMA, no event,
one launch for three copies); elsewhere the host copies it to a device buffer and the graph
copies that apart. Either way the host waits before
writing the buffer again until the step that read it has read it (`read`).
"""
from __future__ import annotations

import logging

import torch

from engines.torch.kernels import step_inputs

log = logging.getLogger(__name__)
_direct_by_device: dict[int, bool] = {}
# On since its GPU run (H100, 2026-12-08: tests/gpu/test_step_inputs_gpu.py passed both ways;
# decode_profile's SmolLM2 step, triton-pinned against triton: two kernels fewer, the host's
# DecodeGraph.run ~17 us and runner+argmax ~15 us a token less, within that run's noise).
READ_PINNED_IN_GRAPH = True


def set_read_pinned(enabled: bool) -> None:
    """READ_PINNED_IN_GRAPH for graphs captured from now on (benchmarks measuring both ways)."""
    global READ_PINNED_IN_GRAPH
    READ_PINNED_IN_GRAPH = enabled


def _kernel_reads_pinned(device: torch.device) -> bool:
    """Once a device: does the input kernel read a pinned host buffer correctly here?
    (Any failure, a launcher refusing host pointers or wrong values, keeps the copies.)"""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _direct_by_device:
        try:
            src = torch.tensor([[7, 8], [9, 10], [11, 12]], dtype=torch.long, pin_memory=True)
            got = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(3)]
            step_inputs.take(src, *got)
            done = torch.cuda.Event()
            done.record()
            done.synchronize()        # not a device-wide wait: another model may be capturing
            _direct_by_device[index] = torch.equal(torch.stack(got).cpu(), src)
        except Exception as exc:  # noqa: BLE001 - any refusal means the copies
            log.info("decode inputs: kernels cannot read pinned memory here (%s); copying them", exc)
            _direct_by_device[index] = False
    return _direct_by_device[index]


class StepInputs:
    """ids [B, 1], pos [B, 1], slots [B] on the device; `load` (host, before a replay),
    `take` (inside the graph, first), `mark_read` (host, after work that took them is queued)."""

    def __init__(self, batch: int, device: torch.device, direct: bool | None = None) -> None:
        """direct: the graph's first kernel reads the pinned buffer, where a probe finds it can
        (None: READ_PINNED_IN_GRAPH)."""
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)
        self.staging = torch.zeros(3, batch, dtype=torch.long, pin_memory=True)
        self.staging_rows = self.staging.numpy()   # filled in place
        wanted = READ_PINNED_IN_GRAPH if direct is None else direct
        self.direct = wanted and _kernel_reads_pinned(device)
        self.staged = None if self.direct else torch.zeros(3, batch, dtype=torch.long, device=device)
        self.read = torch.cuda.Event()

    def load(self, tokens: list[int], positions: list[int], slots: list[int]) -> None:
        """This step's values into the pinned buffer; rows past len(tokens) repeat row 0."""
        n = len(tokens)
        self.read.synchronize()      # the last step has read the buffer
        rows = self.staging_rows
        for i, values in enumerate((tokens, positions, slots)):
            rows[i, :n] = values
            rows[i, n:] = values[0]
        if not self.direct:
            self.staged.copy_(self.staging, non_blocking=True)
            self.read.record()

    def take(self) -> None:
        """Captured first in the step: the device buffers from the host's values."""
        if self.direct:
            step_inputs.take(self.staging, self.ids.view(-1), self.pos.view(-1), self.slots)
            return
        self.ids.copy_(self.staged[0].unsqueeze(1))
        self.pos.copy_(self.staged[1].unsqueeze(1))
        self.slots.copy_(self.staged[2])

    def mark_read(self) -> None:
        """The work queued so far on the current stream reads the pinned buffer: the next load
        waits for it. (Copying, the load's own copy is what reads it.)"""
        if self.direct:
            self.read.record()

    def close(self) -> None:
        self.ids = self.pos = self.slots = self.staged = self.staging = self.staging_rows = None
