"""The layout's parts where some layers slide, checked with hypothesis (no torch)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.kv_cache.layout import KVLayout, KVShape

MiB = 1 << 20


@st.composite
def window_layouts(draw):
    num_layers = draw(st.integers(1, 12))
    window = draw(st.integers(1, 4096))
    windows = tuple(draw(st.lists(st.sampled_from([0, window]), min_size=num_layers, max_size=num_layers)))
    shape = KVShape(num_layers, draw(st.integers(1, 8)), draw(st.sampled_from([32, 64, 128, 256])),
                    draw(st.sampled_from(["float16", "float32"])), windows)
    return KVLayout(shape, draw(st.integers(1, 4)), draw(st.integers(1, 5000)),
                    draw(st.sampled_from([64 * 1024, 2 * MiB])))


def corners(layout: KVLayout, token: int, layer: int) -> list[int]:
    s = layout.shape
    return [layout.element_offset(0, token, layer, v, h, d)
            for v in (False, True) for h in (0, s.num_kv_heads - 1) for d in (0, s.head_dim - 1)]


@settings(max_examples=300, deadline=None)
@given(window_layouts())
def test_parts_are_whole_pages_one_group_each_and_never_overlap(layout):
    s, itemsize, page = layout.shape, layout.shape.itemsize, layout.page_size
    assert len(layout.parts) == bool(s.global_layers) + bool(s.sliding_layers)
    assert layout.slot_bytes % page == 0 and layout.slot_stride * itemsize == layout.slot_bytes
    for part in layout.parts:
        assert part.offset * itemsize % page == 0
        assert {bool(s.window(i)) for i in part.layers} == {bool(part.window)}
        assert part.window == max(s.window(i) for i in part.layers)
        lo, hi = part.offset, part.offset + part.pages * page // itemsize
        for layer in part.layers:   # every element of the part's layers lies in its pages
            for token in (0, layout.max_context - 1):
                assert all(lo <= e < hi for e in corners(layout, token, layer))
    assert sum(p.pages for p in layout.parts) == layout.pages_per_slot


@settings(max_examples=300, deadline=None)
@given(window_layouts(), st.data())
def test_views_reach_the_elements_element_offset_names(layout, data):
    s = layout.shape
    slot = data.draw(st.integers(0, layout.max_slots - 1))
    layer = data.draw(st.integers(0, s.num_layers - 1))
    token = data.draw(st.integers(0, layout.max_context - 1))
    head, dim = data.draw(st.integers(0, s.num_kv_heads - 1)), data.draw(st.integers(0, s.head_dim - 1))
    is_value = data.draw(st.booleans())
    expected = layout.element_offset(slot, token, layer, is_value, head, dim)
    one = layout.layer_view(slot, layer, layout.max_context, is_value)
    assert one.offset + head * one.stride[0] + token * one.stride[1] + dim == expected
    every = layout.batched_view(layer, is_value)
    assert (every.offset + slot * every.stride[0] + head * every.stride[1] + token * every.stride[2]
            + dim == expected)
    part, index = layout.part_of(layer)
    block = layout.part_view(slot, part, token, 1)
    assert (block.offset + index * block.stride[1] + int(is_value) * block.stride[2]
            + head * block.stride[3] + dim == expected)
    page = layout.page_of(slot, token, layer, is_value, head, dim)
    first = layout.part_first_page(slot, part)
    assert first <= page < first + part.pages


@settings(max_examples=200, deadline=None)
@given(window_layouts(), st.data())
def test_part_pages_back_exactly_each_parts_tokens(layout, data):
    n = data.draw(st.integers(1, layout.max_context))
    for part, pages in zip(layout.parts, layout.part_pages(n)):
        last = layout.page_of(0, n - 1, part.layers[-1], True, layout.shape.num_kv_heads - 1,
                              layout.shape.head_dim - 1)
        assert last == layout.part_first_page(0, part) + pages - 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(1, 9000))
def test_all_global_windows_lay_out_exactly_as_no_windows(num_layers, heads, max_context):
    plain = KVLayout(KVShape(num_layers, heads, 64), 2, max_context, 2 * MiB)
    zeros = KVLayout(KVShape(num_layers, heads, 64, windows=(0,) * num_layers), 2, max_context, 2 * MiB)
    assert plain.pages_per_slot == zeros.pages_per_slot
    assert plain.slot_view(1, max_context) == zeros.slot_view(1, max_context)
    last = num_layers - 1
    assert plain.batched_view(last, True) == zeros.batched_view(last, True)


def test_gemma3_shape_puts_five_of_six_layers_in_the_sliding_part():
    windows = tuple(1024 if i % 6 < 5 else 0 for i in range(48))
    layout = KVLayout(KVShape(48, 8, 256, "bfloat16", windows), 1, 32768, 2 * MiB)
    global_part, sliding_part = layout.parts
    assert len(global_part.layers) == 8 and len(sliding_part.layers) == 40
    assert sliding_part.window == 1024
    assert layout.layer_view(0, 0, 1, False).stride == (256, 40 * 2 * 8 * 256, 1)
    assert layout.layer_view(0, 5, 1, False).stride == (256, 8 * 2 * 8 * 256, 1)
