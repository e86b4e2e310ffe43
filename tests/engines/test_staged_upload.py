"""A file's bytes onto the device through two staging buffers (engines/torch/load/staged_upload.py):
every byte lands where it belongs, whatever the chunking, from a read-only memory map too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.torch.load.staged_upload import StagedUpload


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_chunks_through_alternating_buffers_land_in_order(chunk):
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in (1, 100, 333, 4096)]
    with StagedUpload("cpu", chunk_bytes=chunk, staged=True) as upload:
        targets = [torch.empty(len(s), dtype=torch.uint8) for s in sources]
        for source, target in zip(sources, targets):
            upload.copy(source, target)
    assert all(torch.equal(t, torch.from_numpy(s)) for s, t in zip(sources, targets))
    assert upload.bytes_copied == sum(len(s) for s in sources)


def test_a_read_only_memory_map_into_a_typed_slice(tmp_path):
    path = tmp_path / "blob.bin"
    data = np.arange(64, dtype=np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r").reshape(4, 16)
    raw = torch.zeros((8, 16), dtype=torch.uint8)
    with StagedUpload("cpu", chunk_bytes=24, staged=True) as upload:
        upload.copy(mapped, raw[2:6])
    assert torch.equal(raw[2:6].reshape(-1), torch.from_numpy(data)) and int(raw[:2].sum()) == 0


def test_a_source_that_does_not_fill_the_target_is_refused():
    with StagedUpload("cpu") as upload, pytest.raises(ValueError, match="do not fill"):
        upload.copy(np.zeros(10, dtype=np.uint8), torch.empty(12, dtype=torch.uint8))
