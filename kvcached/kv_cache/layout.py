"""Token-to-page arithmetic of the KV cache: where every K and V element lives.

No torch here (CONVENTIONS 3): this is plain integer arithmetic, tested
exhaustively with hypothesis, and the manager turns its answers into tensor
views with `torch.as_strided`.

The layout chosen: **token-major slot regions**. The cache is one virtual
range cut into `max_slots` equal regions, one per live sequence ("slot").
A slot region is `[max_context, L, 2, H_kv, D]` (token, layer, K|V, head,
dim), rounded up to whole pages, so

- a slot is contiguous in virtual memory and grows page by page from its
  start: the mapped pages of a slot are always a prefix of its region;
- one page holds every layer of many tokens (91 tokens of SmolLM2-135M, 16 of
  Llama-3.1-8B per 2 MiB page), so a sequence wastes less than one page in all.
  A layer-major layout (one `[max_context, H, D]` region per layer, K and V)
  costs 2 pages per layer at the first token: 60 pages = 120 MiB for
  SmolLM2-135M's first token, against 1 page = 2 MiB here;
- one layer's K (or V) of one slot is a strided view `[H, T, D]` with the
  last dim contiguous (strides `[D, L*2*H*D, 1]`), which
  `scaled_dot_product_attention` consumes without a copy;
- all slots sit at a fixed stride, so one layer's K over every slot is one
  strided tensor `[S, H, max_context, D]` at a fixed address (unmapped tail
  pages read zeros), which CUDA graphs can capture once.

**Sliding-window layers** (Gemma 2: every other layer; Gemma 3: five of six;
Mistral with a window: all) get a part of their own: where some layers slide,
a slot region is two page-aligned parts, the global layers' `[max_context, Lg,
2, H, D]` then the sliding layers' `[max_context, Ls, 2, H, D]` (a model whose
layers all slide, or none, has one part). A page of the sliding part holds
only sliding layers' tokens, so once the window has moved past them it can be
given back (kv_cache/window.py) while the global layers keep every token. Each
layer's view is still one strided view at a fixed address; only the token
stride differs between the parts. Without windows the layout is exactly the
one-part layout above.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from kvcached.errors import ConfigError, InvalidArgument

# Sizes of the dtypes a KV cache may use, by name; torch and numpy dtypes also
# answer `.itemsize` directly, so either form is accepted.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


def dtype_name(dtype: object) -> str:
    """'float16' for torch.float16, numpy float16 or the string 'float16'."""
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(dtype: object) -> int:
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int) and size > 0:
        return size
    name = dtype_name(dtype)
    if name not in DTYPE_SIZES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_SIZES)}")
    return DTYPE_SIZES[name]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVShape:
    """A model's KV shape: layers, KV heads, head dim and element type."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: object = "float16"   # torch.dtype or its name
    windows: tuple[int, ...] = ()   # per layer: sliding window in tokens, 0 global; (): all global

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key}: {value!r} must be a positive int")
        dtype_itemsize(self.dtype)  # validates
        if self.windows and len(self.windows) != self.num_layers:
            raise ConfigError(f"windows: {len(self.windows)} given for {self.num_layers} layers")
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in self.windows):
            raise ConfigError(f"windows: {self.windows!r} must be ints >= 0")

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.window(i))

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.window(i))

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @property
    def token_elems(self) -> int:
        """Elements of one token across all layers, K and V."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def token_bytes(self) -> int:
        return self.token_elems * self.itemsize


@dataclass(frozen=True)
class Part:
    """One page-aligned part of every slot region: `[max_context, len(layers), 2, H, D]`."""
    layers: tuple[int, ...]   # the model layers it holds, in order
    window: int               # 0: global; else the largest window of its layers (what is kept)
    offset: int               # elements from the slot's start, a whole number of pages
    pages: int                # pages per slot
    token_elems: int          # elements of one token of this part's layers, K and V

    def pages_for(self, n_tokens: int, page_size: int, itemsize: int) -> int:
        """Pages from this part's start that back tokens [0, n_tokens)."""
        return ceil_div(n_tokens * self.token_elems * itemsize, page_size)


@dataclass(frozen=True)
class ViewSpec:
    """Arguments of `torch.as_strided` over the flat cache tensor (in elements)."""
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class KVLayout:
    """Where each element of a `max_slots x max_context` cache lives, in pages."""
    shape: KVShape
    max_slots: int
    max_context: int
    page_size: int

    def __post_init__(self) -> None:
        for key in ("max_slots", "max_context", "page_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key}: {value!r} must be a positive int")
        if self.page_size % self.shape.itemsize:
            raise ConfigError(f"page_size: {self.page_size} is not a multiple of the dtype size")

    # --- parts ---------------------------------------------------------------
    @cached_property
    def parts(self) -> tuple[Part, ...]:
        """The global layers' part, then the sliding layers' (an empty group has none)."""
        s, parts, offset = self.shape, [], 0
        sliding = s.sliding_layers
        groups = ((s.global_layers, 0), (sliding, max((s.window(i) for i in sliding), default=0)))
        for layers, window in groups:
            if not layers:
                continue
            token_elems = len(layers) * 2 * s.num_kv_heads * s.head_dim
            pages = ceil_div(self.max_context * token_elems * s.itemsize, self.page_size)
            parts.append(Part(layers, window, offset, pages, token_elems))
            offset += pages * self.page_size // s.itemsize
        return tuple(parts)

    @cached_property
    def _layer_place(self) -> dict[int, tuple[Part, int]]:
        return {layer: (part, i) for part in self.parts for i, layer in enumerate(part.layers)}

    def part_of(self, layer: int) -> tuple[Part, int]:
        """The part holding a model layer, and the layer's index within it."""
        self.check_layer(layer)
        return self._layer_place[layer]

    def part_pages(self, n_tokens: int) -> tuple[int, ...]:
        """Per part, pages from its start that back tokens [0, n_tokens)."""
        self.check_tokens(n_tokens)
        return tuple(p.pages_for(n_tokens, self.page_size, self.shape.itemsize) for p in self.parts)

    def part_first_page(self, slot: int, part: Part) -> int:
        """Index of a part's first page of one slot, in the whole cache range."""
        return self.first_page(slot) + part.offset * self.shape.itemsize // self.page_size

    # --- sizes -------------------------------------------------------------
    @property
    def pages_per_slot(self) -> int:
        return sum(p.pages for p in self.parts)

    @property
    def slot_bytes(self) -> int:
        return self.pages_per_slot * self.page_size

    @property
    def slot_stride(self) -> int:
        """Elements from one slot's start to the next's (a whole number of pages)."""
        return self.slot_bytes // self.shape.itemsize

    @property
    def total_pages(self) -> int:
        return self.max_slots * self.pages_per_slot

    @property
    def total_bytes(self) -> int:
        return self.total_pages * self.page_size

    @property
    def total_elems(self) -> int:
        return self.total_bytes // self.shape.itemsize

    @property
    def tokens_per_page(self) -> float:
        return self.page_size / self.shape.token_bytes

    # --- pages ---------------------------------------------------------------
    def pages_for_tokens(self, n_tokens: int) -> int:
        """Pages that back tokens [0, n_tokens) of a slot with nothing given back (with
        one part: the first pages of its region)."""
        return sum(self.part_pages(n_tokens))

    def pages_held_at_most(self, n_tokens: int, reach: int) -> int:
        """Pages a slot growing to n_tokens can hold at once when no step ensures more than
        `reach` tokens past where it starts: a sliding part keeps its window and one step's
        reach (window.py gives back what lies wholly before), plus the two pages its ends
        may straddle. What a KV budget books for a windowed model."""
        total = 0
        for part, pages in zip(self.parts, self.part_pages(n_tokens)):
            if part.window:
                pages = min(pages, part.pages_for(part.window + reach, self.page_size, self.shape.itemsize) + 2)
            total += pages
        return total

    def pages_held_at_least(self, n_tokens: int) -> int:
        """Pages a slot with n_tokens live tokens surely holds: a sliding part keeps at
        least its window's whole pages (it gives back only what lies before the window)."""
        total = 0
        for part, pages in zip(self.parts, self.part_pages(n_tokens)):
            if part.window:
                pages = min(pages, part.window * part.token_elems * self.shape.itemsize // self.page_size)
            total += pages
        return total

    def first_page(self, slot: int) -> int:
        """Index of a slot's first page in the whole cache range."""
        self.check_slot(slot)
        return slot * self.pages_per_slot

    def page_of(self, slot: int, token: int, layer: int, is_value: bool, head: int, dim: int) -> int:
        """The page (absolute index) holding one element; used to test the views."""
        return self.element_offset(slot, token, layer, is_value, head, dim) * self.shape.itemsize // self.page_size

    def element_offset(self, slot: int, token: int, layer: int, is_value: bool, head: int, dim: int) -> int:
        s = self.shape
        part, index = self.part_of(layer)
        return (slot * self.slot_stride + part.offset + token * part.token_elems
                + (index * 2 + int(is_value)) * s.num_kv_heads * s.head_dim
                + head * s.head_dim + dim)

    def mapped_bytes_for(self, n_tokens: int) -> int:
        return self.pages_for_tokens(n_tokens) * self.page_size

    def live_bytes_for(self, n_tokens: int) -> int:
        self.check_tokens(n_tokens)
        return n_tokens * self.shape.token_bytes

    # --- views ---------------------------------------------------------------
    def layer_view(self, slot: int, layer: int, n_tokens: int, is_value: bool) -> ViewSpec:
        """One slot's K (or V) for one layer: [H, T, D], last dim contiguous."""
        self.check_slot(slot)
        self.check_layer(layer)
        self.check_tokens(n_tokens)
        s = self.shape
        return ViewSpec(
            size=(s.num_kv_heads, n_tokens, s.head_dim),
            stride=(s.head_dim, self.part_of(layer)[0].token_elems, 1),
            offset=self.element_offset(slot, 0, layer, is_value, 0, 0),
        )

    def part_view(self, slot: int, part: Part, first: int, n_tokens: int) -> ViewSpec:
        """Tokens [first, first + n_tokens) of one part of a slot as one contiguous
        [T, Lp, 2, H, D] block (a copy of a prefix is one copy a part)."""
        self.check_slot(slot)
        self.check_tokens(first + n_tokens)
        s = self.shape
        size = (n_tokens, len(part.layers), 2, s.num_kv_heads, s.head_dim)
        stride = (part.token_elems, 2 * s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                  s.head_dim, 1)
        return ViewSpec(size, stride, slot * self.slot_stride + part.offset + first * part.token_elems)

    def slot_view(self, slot: int, n_tokens: int) -> ViewSpec:
        """A slot's first n_tokens as one contiguous [T, L, 2, H, D] block: one-part
        layouts only (with sliding layers, a slot's tokens are one block a part)."""
        if len(self.parts) != 1 or self.parts[0].layers != tuple(range(self.shape.num_layers)):
            raise InvalidArgument("slot_view: this layout has a part a layer group; use part_view")
        return self.part_view(slot, self.parts[0], 0, n_tokens)

    def batched_view(self, layer: int, is_value: bool) -> ViewSpec:
        """One layer's K (or V) over every slot: [S, H, max_context, D]."""
        self.check_layer(layer)
        s = self.shape
        return ViewSpec(
            size=(self.max_slots, s.num_kv_heads, self.max_context, s.head_dim),
            stride=(self.slot_stride, s.head_dim, self.part_of(layer)[0].token_elems, 1),
            offset=self.element_offset(0, 0, layer, is_value, 0, 0),
        )

    # --- checks --------------------------------------------------------------
    def check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.max_slots:
            raise InvalidArgument(f"slot: {slot!r} is not in [0, {self.max_slots})")

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.shape.num_layers:
            raise InvalidArgument(f"layer: {layer!r} is not in [0, {self.shape.num_layers})")

    def check_tokens(self, n_tokens: int) -> None:
        if not isinstance(n_tokens, int) or not 0 <= n_tokens <= self.max_context:
            raise InvalidArgument(f"n_tokens: {n_tokens!r} is not in [0, {self.max_context}]")


def layer_major_pages(shape: KVShape, n_tokens: int, page_size: int) -> int:
    """Pages a layer-major layout (separate K and V regions per layer) maps for
    one sequence of n_tokens: the comparison the token-major choice is made against."""
    per_region = ceil_div(n_tokens * shape.num_kv_heads * shape.head_dim * shape.itemsize, page_size)
    return shape.num_layers * 2 * per_region
