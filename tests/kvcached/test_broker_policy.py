"""The broker's pure decisions, driven by scripted memory and client snapshots."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.broker.client import Step
from kvcached.broker.sample import MemorySample
from kvcached.broker.policy import (PRESSURE_THRESHOLD, Action, ClientView, admission_need,
                                    admission_plan, admission_reclaimable, eligible,
                                    eligible_for_admission, plan, pressure_need, reclaimable_bytes)

GiB = 1 << 30


def sample(free: int, pressure: float | None = None) -> MemorySample:
    return MemorySample(80 * GiB, free, 10 * GiB, 70 * GiB - free, pressure)


def view(name, priority=0, held=GiB, busy=False, idle_since=0.0, min_bytes=0, cached=None, booked=0):
    return ClientView(name, priority, min_bytes, held, busy, idle_since, cached, booked)


def test_no_need_while_the_headroom_is_free():
    assert not pressure_need(sample(2 * GiB), GiB).is_needed
    need = pressure_need(sample(GiB // 4), GiB)
    assert need.bytes == 3 * GiB // 4 and need.steps[0] is Step.POOL


def test_psi_pressure_runs_only_cheap_steps():
    need = pressure_need(sample(4 * GiB, pressure=PRESSURE_THRESHOLD + 1), GiB)
    assert need.is_needed and Step.PAUSE not in need.steps and Step.TRIM in need.steps
    assert not pressure_need(sample(4 * GiB, pressure=0.5), GiB).is_needed


def test_cheapest_step_first_then_lowest_priority_then_idlest():
    views = [view("hi", priority=5, idle_since=1.0), view("lo-recent", idle_since=9.0),
             view("lo-old", idle_since=2.0)]
    actions = plan(views)
    assert actions[0] == Action(Step.POOL, None)
    assert actions[1:4] == [Action(Step.TRIM, "lo-old"), Action(Step.TRIM, "lo-recent"),
                            Action(Step.TRIM, "hi")]
    steps = [a.step for a in actions]
    assert steps == sorted(steps, key=list(Step).index)


def test_busy_clients_are_trimmed_but_never_paused_or_unloaded():
    actions = plan([view("busy", busy=True)])
    assert {a.step for a in actions} == {Step.POOL, Step.TRIM, Step.DROP_PREFIXES}


def test_pinned_minimum_is_kept():
    pinned = view("pinned", held=GiB, min_bytes=GiB)
    assert plan([pinned], has_pool=False) == []
    above = view("above", held=2 * GiB, min_bytes=GiB)
    assert {a.step for a in plan([above], has_pool=False)} == {Step.TRIM, Step.DROP_PREFIXES}
    assert reclaimable_bytes([pinned, above]) == GiB


def test_admission_takes_only_lower_priorities_and_never_the_asker():
    views = [view("asker", priority=3), view("peer", priority=3), view("low", priority=1)]
    actions = plan(views, below_priority=3, exclude="asker", has_pool=False)
    assert {a.client for a in actions} == {"low"}
    assert reclaimable_bytes(views, below_priority=3, exclude="asker") == GiB


def test_admission_need_counts_budget_and_headroom():
    # 8 GiB free, 1 GiB headroom: 7 GiB fit, 9 need 2 back.
    assert admission_need(sample(8 * GiB), GiB, None, 0, 7 * GiB) == 0
    assert admission_need(sample(8 * GiB), GiB, None, 0, 9 * GiB) == 2 * GiB
    # Budget 10 GiB, 9 held: 3 more need 2 back even with the device free.
    assert admission_need(sample(60 * GiB), GiB, 10 * GiB, 9 * GiB, 3 * GiB) == 2 * GiB


def test_admission_takes_cheap_steps_from_any_priority_whole_steps_from_lower_idle():
    views = [view("asker", priority=3), view("peer", priority=3, cached=GiB // 2),
             view("high", priority=7, busy=True, cached=GiB // 4), view("low", priority=1),
             view("low-busy", priority=1, busy=True, cached=0)]
    actions = admission_plan(views, 3, "asker", has_pool=False)
    by_step = {step: [a.client for a in actions if a.step is step] for step in Step}
    assert by_step[Step.TRIM] == ["low", "peer", "high"]            # lowest priority first
    assert by_step[Step.DROP_PREFIXES] == ["low", "peer", "high"]
    assert by_step[Step.PAUSE] == ["low"] and by_step[Step.UNLOAD] == ["low"]
    assert "asker" not in {a.client for a in actions}
    # Counted on: the others' cached KV, and all of an idle lower-priority client; never
    # a busy client's running KV (the old bound counted low-busy's whole GiB).
    assert admission_reclaimable(views, 3, "asker") == GiB // 2 + GiB // 4 + GiB
    assert not eligible_for_admission(views[2], Step.PAUSE, 3)      # higher priority
    assert not eligible_for_admission(views[4], Step.TRIM, 3)       # nothing cached


def test_admission_counts_what_is_promised_but_not_mapped():
    # 8 GiB free on the device, but 3 are promised to a client that has not mapped them.
    assert admission_need(sample(8 * GiB), GiB, None, 0, 5 * GiB, booked=3 * GiB) == GiB


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4 * GiB), st.booleans(),
                          st.one_of(st.none(), st.integers(0, 4 * GiB)), st.integers(0, 2 * GiB)),
                min_size=1, max_size=6), st.integers(0, 3))
def test_every_admission_plan_respects_the_rules(rows, priority):
    views = [view(f"c{i}", p, held, busy, 0.0, mn, None if c is None else min(c, held))
             for i, (p, held, busy, c, mn) in enumerate(rows)]
    by_name = {v.name: v for v in views}
    actions = admission_plan(views, priority, "c0", has_pool=False)
    for a in actions:
        v = by_name[a.client]
        assert a.client != "c0" and eligible(v, a.step)
        if a.step in (Step.PAUSE, Step.UNLOAD):
            assert v.priority < priority and not v.is_busy and v.min_bytes == 0
        else:
            assert v.cached_bytes != 0
    # Never more than the steps can give: cached (above the minimum) or all of a victim.
    bound = sum(v.held_bytes if (v.priority < priority and not v.is_busy and v.min_bytes == 0)
                else min(v.cached_bytes or 0, max(0, v.held_bytes - v.min_bytes))
                for v in views[1:])
    assert admission_reclaimable(views, priority, "c0") <= bound


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4 * GiB), st.booleans(),
                          st.floats(0, 100), st.integers(0, 2 * GiB)), max_size=6))
def test_every_plan_respects_the_rules(rows):
    views = [view(f"c{i}", p, held, busy, idle, mn) for i, (p, held, busy, idle, mn) in enumerate(rows)]
    by_name = {v.name: v for v in views}
    actions = plan(views)
    order = list(Step)
    assert [order.index(a.step) for a in actions] == sorted(order.index(a.step) for a in actions)
    for a in actions:
        if a.client is None:
            continue
        v = by_name[a.client]
        assert eligible(v, a.step)
        assert not (v.is_busy and a.step in (Step.PAUSE, Step.UNLOAD))
        assert not (v.min_bytes and a.step in (Step.PAUSE, Step.UNLOAD))
        assert v.held_bytes > v.min_bytes
    # Within one step, priorities never go down.
    for step in Step:
        prios = [by_name[a.client].priority for a in actions if a.step is step and a.client]
        assert prios == sorted(prios)
