"""TokenHistory reads as prompt + output does: every index, negative ones, every slice
(penalties take the last repeat_last_n), and it follows tokens appended after it was made."""
from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from engines.torch.serve.sampling import apply_penalties
from engines.torch.serve.token_history import TokenHistory
from engines.types import SamplingParams

tokens = st.lists(st.integers(0, 1000), max_size=12)
bound = st.one_of(st.none(), st.integers(-30, 30))


@given(tokens, tokens, bound, bound, st.sampled_from([None, 1, 2, -1]))
@example([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 6, 3, None)       # an empty slice past the prompt
def test_reads_as_the_joined_list(prompt, output, start, stop, step):
    joined, view = prompt + output, TokenHistory(prompt, output)
    assert len(view) == len(joined) and list(view) == joined
    assert view[start:stop:step] == joined[start:stop:step]
    for i in range(-len(joined), len(joined)):
        assert view[i] == joined[i]


def test_out_of_range_and_later_tokens():
    prompt, output = [1, 2], [3]
    view = TokenHistory(prompt, output)
    with pytest.raises(IndexError):
        view[3]
    output.append(4)
    assert view[-1] == 4 and len(view) == 4


def test_penalties_read_the_view_as_the_list():
    import torch

    params = SamplingParams(repeat_penalty=1.3, presence_penalty=0.5, repeat_last_n=3)
    logits = torch.linspace(-2, 2, 10)
    prompt, output = [1, 2, 3, 4], [5, 5]
    assert torch.equal(apply_penalties(logits, params, TokenHistory(prompt, output)),
                       apply_penalties(logits, params, prompt + output))
