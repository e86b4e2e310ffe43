"""Stop strings with hold-back: the client never sees a stop string or any part of one."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.torch.serve.stops import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush(), m.is_stopped


def test_stop_split_across_pieces_is_held_then_dropped():
    m = StopMatcher(("</end>",))
    assert m.feed("hello </") == "hello "
    assert m.feed("en") == ""
    assert m.feed("d> more") == ""
    assert m.is_stopped and m.flush() == ""


def test_held_text_is_released_when_it_cannot_match():
    m = StopMatcher(("STOP",))
    assert m.feed("ST") == ""
    assert m.feed("AR") == "STAR"
    assert m.feed("S") == ""
    assert m.flush() == "S"


def test_earliest_of_several_stops_wins_and_empty_stop_is_ignored():
    assert run(("bb", "a", ""), ["xxb", "ba"]) == ("xx", True)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n<>", max_size=40), stops=st.lists(st.text(alphabet="ab\n<>", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_any_split_gives_the_text_before_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(tuple(stops), pieces) == stopped_at_first_piece_that_completes_a_stop(text, stops, bounds)


def stopped_at_first_piece_that_completes_a_stop(text, stops, bounds):
    """Generation ends with the first piece (token) after which the text holds a stop
    string; the client gets the text before the earliest stop seen by then. Later
    text is never generated, so a longer stop that starts earlier but would only
    complete after that piece does not count (text "<a<", stops "a" and "<a<", pieces
    "<a" + "<": "<", stopped by "a")."""
    for end in bounds[1:]:
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            return text[:min(found)], True
    return text, False


def test_a_stop_that_completes_first_wins_over_a_longer_one_that_starts_earlier():
    assert run(("a", "<a<"), ["<a", "<"]) == ("<", True)
    assert run(("a", "<a<"), ["<a<"]) == ("", True)
