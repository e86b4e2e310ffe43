"""The load shapes and latency arithmetic of the end-to-end benchmarks (no daemon needed).

benchmarks/colocate.py sizes its static split from these ramps and judges its
result with these percentiles, so they must be right on their own.
"""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.load_gen import (
    LoadShapeError, Ramp, make_prompt, percentile, ratio, staggered_ramps, summarize, think_times,
    throughput, words_for_tokens,
)
from benchmarks.stream_client import (
    TEXTLESS, RequestRecord, StreamState, feed_ollama, feed_openai, finish, parse_sse_line,
)


def test_percentile_matches_linear_interpolation() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
@settings(max_examples=200, deadline=None)
def test_percentile_is_monotone_and_bounded(values: list[float], q1: float, q2: float) -> None:
    low, high = sorted((q1, q2))
    assert min(values) <= percentile(values, low) <= percentile(values, high) <= max(values)


def test_summary_and_ratios() -> None:
    s = summarize([0.1, 0.2, 0.3, 0.4])
    assert s.count == 4 and s.mean == pytest.approx(0.25) and s.max == 0.4
    assert s.as_dict(scale=1000)["p50"] == pytest.approx(250.0)
    empty = summarize([])
    assert empty.count == 0 and empty.as_dict()["p99"] is None
    assert throughput(100, 2.0, 4.0) == 50.0 and throughput(5, 1.0, 1.0) == 0.0
    assert ratio(10.0, 2.0) == 5.0 and math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1))


def test_ramp_climbs_holds_and_falls() -> None:
    ramp = Ramp(start_s=10, rise_s=10, hold_s=5, fall_s=10, base_users=2, peak_users=12, end_s=40)
    assert ramp.users_at(0) == 2 and ramp.users_at(9.9) == 2
    assert ramp.users_at(15) == 7                      # half way up
    assert all(ramp.users_at(t) == 12 for t in (20, 22, 24.9))
    assert ramp.users_at(35.1) == 2 and ramp.users_at(39.9) == 2
    assert ramp.users_at(40) == 0                      # the run is over
    climb = [ramp.users_at(10 + i * 0.5) for i in range(21)]
    assert climb == sorted(climb)
    assert ramp.at_peak(20) and not ramp.at_peak(25) and not ramp.at_peak(19.9)


@given(st.integers(1, 5), st.integers(0, 4), st.integers(1, 40),
       st.floats(0.5, 30), st.floats(0.5, 30), st.floats(0.5, 30))
@settings(max_examples=100, deadline=None)
def test_staggered_peaks_never_overlap(n: int, base: int, extra: int, rise: float, hold: float,
                                       fall: float) -> None:
    ramps = staggered_ramps(n, base_users=base, peak_users=base + extra, rise_s=rise, hold_s=hold,
                            fall_s=fall, lead_s=1.0, tail_s=2.0)
    for a, b in zip(ramps, ramps[1:]):
        assert a.peak_end_s <= b.peak_start_s
    for ramp in ramps:
        assert ramp.users_at(ramp.peak_start_s + hold / 2) == base + extra
        for u in range(ramp.peak_users):
            on, off = ramp.window(u)
            assert 0 <= on <= off <= ramp.end_s
    # While one model peaks, every other model is at its base.
    for i, ramp in enumerate(ramps):
        mid = ramp.peak_start_s + hold / 2
        assert all(other.users_at(mid) == base for j, other in enumerate(ramps) if j != i)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(LoadShapeError):
        Ramp(0, 1, 1, 1, base_users=5, peak_users=2, end_s=10)
    with pytest.raises(LoadShapeError):
        Ramp(0, -1, 1, 1, base_users=0, peak_users=2, end_s=10)
    with pytest.raises(LoadShapeError):
        Ramp(0, 1, 1, 1, base_users=0, peak_users=2, end_s=2)
    with pytest.raises(LoadShapeError):
        staggered_ramps(0, base_users=0, peak_users=1, rise_s=1, hold_s=1, fall_s=1)
    with pytest.raises(LoadShapeError):
        Ramp(0, 1, 1, 1, base_users=0, peak_users=2, end_s=10).window(2)


def test_prompts_and_think_times_are_seeded() -> None:
    a, b = random.Random(7), random.Random(7)
    assert make_prompt(a, 50) == make_prompt(b, 50)
    assert len(make_prompt(random.Random(1), 50).split()) == 50
    assert make_prompt(random.Random(1), 50) != make_prompt(random.Random(2), 50)
    pauses = think_times(random.Random(3), 0.5, 4000)
    assert sum(pauses) / len(pauses) == pytest.approx(0.5, rel=0.1)
    assert think_times(random.Random(3), 0.0, 3) == [0.0, 0.0, 0.0]
    assert words_for_tokens(256, 400, 500) == 205
    with pytest.raises(LoadShapeError):
        words_for_tokens(256, 0, 10)


def test_openai_stream_lines_fold_into_a_record() -> None:
    state = StreamState()
    record = RequestRecord("m", "completion", t_send=1.0)
    lines = ['data: {"choices":[{"text":""}]}', "", ": keep-alive",
             'data: {"choices":[{"text":"Hi"}]}', 'data: {"choices":[{"text":" there"}]}',
             'data: {"choices":[],"usage":{"completion_tokens":3}}', "data: [DONE]"]
    seen = []
    for line in lines:
        feed_openai(state, parse_sse_line(line))
        seen.append(state.saw_text)
    assert seen == [False, False, False, True, True, False, False]
    record.t_first = 1.5
    finish(record, state, 3.0)
    assert record.ok and record.num_tokens == 3 and record.ttft == pytest.approx(0.5)


def test_ollama_lines_and_failures() -> None:
    state = StreamState()
    for line in ['{"response":"a","done":false}', '{"response":"","done":true,"eval_count":7}']:
        feed_ollama(state, line)
    record = finish(RequestRecord("m", "generate", 0.0, t_first=0.2), state, 1.0)
    assert record.ok and record.num_tokens == 7
    broken = StreamState()
    feed_ollama(broken, '{"message":{"content":"x"},"done":false}')
    feed_ollama(broken, '{"error":"out of memory"}')
    failed = finish(RequestRecord("m", "chat", 0.0, t_first=0.1), broken, 1.0)
    assert not failed.ok and "out of memory" in failed.error
    cut = StreamState()
    feed_ollama(cut, '{"response":"a","done":false}')
    assert finish(RequestRecord("m", "generate", 0.0, t_first=0.1), cut, 1.0).error is not None


def test_a_stream_of_tokens_without_text_is_told_apart() -> None:
    """A random-weight model may answer only tokens that render no text: the record says
    so with TEXTLESS (cold_start then times the response's end), not a generic failure."""
    state = StreamState()
    for line in ['data: {"choices":[],"usage":{"completion_tokens":4}}', "data: [DONE]"]:
        feed_openai(state, parse_sse_line(line))
    record = finish(RequestRecord("m", "completion", t_send=1.0), state, 2.5)
    assert record.error == TEXTLESS and record.t_end - record.t_send == pytest.approx(1.5)
