"""A captured decode step reads its tokens, positions and slots from the pinned host buffer
(engines/torch/serve/step_inputs.py): on the lent GPU the kernel reads pinned memory, and a
graph replayed after each new load sees that load's values, never an earlier one's."""
from __future__ import annotations

import pytest
import torch

from engines.torch.serve.step_inputs import StepInputs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("direct", [True, False])
def test_the_graph_reads_each_load_of_the_pinned_buffer(direct: bool):
    inputs = StepInputs(4, torch.device("cuda"), direct=direct)
    assert inputs.direct == direct, "kernels read pinned memory on this GPU: the copies would be taken instead"
    inputs.load([0], [0], [0])
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        inputs.take()                                       # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        inputs.take()
        seen = torch.stack([inputs.ids.view(-1), inputs.pos.view(-1), inputs.slots]) * 1
    for step in range(1, 21):
        tokens, positions, slots = [step, step + 1], [10 * step, 10 * step + 1], [step % 4, 3]
        inputs.load(tokens, positions, slots)
        graph.replay()
        inputs.mark_read()
        want = [tokens + [step] * 2, positions + [10 * step] * 2, slots + [step % 4] * 2]
        assert seen.cpu().tolist() == want, f"replay {step} read stale inputs"
