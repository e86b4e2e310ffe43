"""Bytes onto the GPU through two pinned buffers, the DMA of one chunk overlapping the
host's fill of the next (engines/torch/load/staged_upload.py): exact, in order, and
the buffers free once the upload ends."""
from __future__ import annotations

import numpy as np
import torch

from engines.torch.load.staged_upload import StagedUpload


def test_pinned_chunks_land_on_the_gpu_exactly():
    rng = np.random.default_rng(1)
    sources = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in (3, 5000, 1 << 20, 3 << 20)]
    targets = [torch.empty(len(s), dtype=torch.uint8, device="cuda") for s in sources]
    with StagedUpload("cuda", chunk_bytes=1 << 20) as upload:
        for source, target in zip(sources, targets):
            upload.copy(source, target)
    assert all(torch.equal(t.cpu(), torch.from_numpy(s)) for s, t in zip(sources, targets))
    assert upload._buffers == []
