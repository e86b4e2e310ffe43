"""The token-to-page arithmetic, checked exhaustively with hypothesis (no torch)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.errors import ConfigError, InvalidArgument
from kvcached.kv_cache.layout import KVLayout, KVShape, ceil_div, dtype_itemsize, layer_major_pages

MiB = 1 << 20

shapes = st.builds(
    KVShape,
    num_layers=st.integers(1, 48),
    num_kv_heads=st.integers(1, 16),
    head_dim=st.sampled_from([32, 64, 80, 96, 128, 256]),
    dtype=st.sampled_from(["float16", "bfloat16", "float32", "int8"]),
)
page_sizes = st.sampled_from([64 * 1024, 2 * MiB, 32 * MiB])


@st.composite
def layouts(draw):
    return KVLayout(draw(shapes), draw(st.integers(1, 8)), draw(st.integers(1, 9000)), draw(page_sizes))


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_slots_are_whole_pages_and_never_overlap(layout):
    assert layout.slot_bytes % layout.page_size == 0
    assert layout.slot_bytes >= layout.max_context * layout.shape.token_bytes
    # The last element of a slot lies before the next slot's first page.
    s = layout.shape
    last = layout.element_offset(0, layout.max_context - 1, s.num_layers - 1, True,
                                 s.num_kv_heads - 1, s.head_dim - 1)
    assert last < layout.slot_stride
    assert layout.total_bytes == layout.max_slots * layout.slot_bytes


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_pages_for_tokens_backs_exactly_the_live_elements(layout, data):
    n = data.draw(st.integers(0, layout.max_context))
    pages = layout.pages_for_tokens(n)
    slot = data.draw(st.integers(0, layout.max_slots - 1))
    s = layout.shape
    if n == 0:
        assert pages == 0
        return
    # The last live element lies in the last backed page, the first element in the first.
    last_page = layout.page_of(slot, n - 1, s.num_layers - 1, True, s.num_kv_heads - 1, s.head_dim - 1)
    assert last_page == layout.first_page(slot) + pages - 1
    assert layout.page_of(slot, 0, 0, False, 0, 0) == layout.first_page(slot)
    # Minimal: one page fewer would not hold the live bytes.
    assert (pages - 1) * layout.page_size < layout.live_bytes_for(n) <= pages * layout.page_size
    # Waste is under one page per sequence.
    assert layout.mapped_bytes_for(n) - layout.live_bytes_for(n) < layout.page_size


@settings(max_examples=200, deadline=None)
@given(layouts(), st.data())
def test_layer_view_addresses_match_element_offsets(layout, data):
    s = layout.shape
    slot = data.draw(st.integers(0, layout.max_slots - 1))
    layer = data.draw(st.integers(0, s.num_layers - 1))
    n = data.draw(st.integers(1, layout.max_context))
    is_value = data.draw(st.booleans())
    h = data.draw(st.integers(0, s.num_kv_heads - 1))
    t = data.draw(st.integers(0, n - 1))
    d = data.draw(st.integers(0, s.head_dim - 1))
    view = layout.layer_view(slot, layer, n, is_value)
    assert view.size == (s.num_kv_heads, n, s.head_dim)
    assert view.stride[-1] == 1
    at = view.offset + h * view.stride[0] + t * view.stride[1] + d
    assert at == layout.element_offset(slot, t, layer, is_value, h, d)
    batched = layout.batched_view(layer, is_value)
    at_b = batched.offset + slot * batched.stride[0] + h * batched.stride[1] + t * batched.stride[2] + d
    assert at_b == at
    block = layout.slot_view(slot, n)
    at_s = block.offset + t * block.stride[0] + layer * block.stride[1] + int(is_value) * block.stride[2] \
        + h * block.stride[3] + d
    assert at_s == at and block.stride == tuple(
        math.prod(block.size[i + 1:]) for i in range(5))
    assert batched.size == (layout.max_slots, s.num_kv_heads, layout.max_context, s.head_dim)


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(1, 8000))
def test_token_major_never_maps_more_than_layer_major(shape, n):
    layout = KVLayout(shape, 1, 8000, 2 * MiB)
    assert layout.pages_for_tokens(n) <= layer_major_pages(shape, n, 2 * MiB)


def test_smollm2_first_token_costs_one_page_not_sixty():
    shape = KVShape(30, 3, 64, "float16")
    layout = KVLayout(shape, 4, 2048, 2 * MiB)
    assert shape.token_bytes == 23040
    assert layout.pages_for_tokens(1) == 1
    assert layer_major_pages(shape, 1, 2 * MiB) == 60
    assert layout.pages_for_tokens(91) == 1 and layout.pages_for_tokens(92) == 2


def test_dtype_forms_agree():
    torch = pytest.importorskip("torch")
    assert dtype_itemsize(torch.bfloat16) == dtype_itemsize("bfloat16") == 2
    assert KVShape(1, 1, 8, torch.float32).itemsize == 4


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=0, num_kv_heads=1, head_dim=8),
    dict(num_layers=1, num_kv_heads=-1, head_dim=8),
    dict(num_layers=1, num_kv_heads=1, head_dim=8, dtype="complex7"),
    dict(num_layers=1.5, num_kv_heads=1, head_dim=8),
])
def test_bad_shapes_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        KVShape(**kwargs)


def test_bad_layout_and_arguments_are_typed_errors():
    shape = KVShape(2, 2, 8)
    with pytest.raises(ConfigError):
        KVLayout(shape, 0, 10, 2 * MiB)
    layout = KVLayout(shape, 2, 10, 2 * MiB)
    for call in (lambda: layout.pages_for_tokens(11), lambda: layout.first_page(2),
                 lambda: layout.layer_view(0, 2, 1, False), lambda: layout.pages_for_tokens(-1)):
        with pytest.raises(InvalidArgument):
            call()


def test_ceil_div():
    assert [ceil_div(a, 4) for a in range(9)] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
