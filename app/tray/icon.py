"""The tray picture, drawn with Pillow: a vessel whose water level is the memory the models hold.

The water rises from the bottom in proportion to the device memory the models
hold; what other applications hold hangs from the top as a grey band, so the
gap between the two is what is free. Each mode has its own colour and a mark
that survives at 16 px: an ebbing arrow (yielding), two bars (paused), an
exclamation mark (error), an empty dashed vessel (starting).
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

from app.tray.view import TrayMode, TrayView


@dataclass(frozen=True)
class Look:
    water: tuple[int, int, int, int]
    rim: tuple[int, int, int, int]


LOOKS: dict[TrayMode, Look] = {
    TrayMode.NORMAL: Look((32, 178, 170, 255), (225, 240, 240, 255)),
    TrayMode.YIELDING: Look((245, 166, 35, 255), (255, 236, 200, 255)),
    TrayMode.PAUSED: Look((120, 140, 170, 255), (205, 215, 230, 255)),
    TrayMode.ERROR: Look((200, 40, 40, 255), (255, 90, 90, 255)),
    TrayMode.STARTING: Look((110, 110, 110, 255), (170, 170, 170, 255)),
}
INSIDE = (24, 32, 40, 255)
OTHERS = (120, 120, 130, 255)
MARK = (255, 255, 255, 255)
MIN_SHOWN = 0.06  # a model that holds anything shows at least a visible film of water


def _water_level(view: TrayView) -> float:
    if view.held_bytes <= 0:
        return 0.0
    return max(MIN_SHOWN, view.held_fraction)


def _mark_pause(draw: ImageDraw.ImageDraw, s: float) -> None:
    for x in (0.36, 0.56):
        draw.rectangle([x * s, 0.32 * s, (x + 0.1) * s, 0.68 * s], fill=MARK)


def _mark_yield(draw: ImageDraw.ImageDraw, s: float) -> None:
    draw.rectangle([0.45 * s, 0.24 * s, 0.55 * s, 0.52 * s], fill=MARK)
    draw.polygon([(0.32 * s, 0.5 * s), (0.68 * s, 0.5 * s), (0.5 * s, 0.74 * s)], fill=MARK)


def _mark_error(draw: ImageDraw.ImageDraw, s: float) -> None:
    draw.rectangle([0.44 * s, 0.22 * s, 0.56 * s, 0.6 * s], fill=MARK)
    draw.rectangle([0.44 * s, 0.67 * s, 0.56 * s, 0.79 * s], fill=MARK)


def _mark_starting(draw: ImageDraw.ImageDraw, s: float) -> None:
    for i in range(3):
        x = (0.3 + 0.2 * i) * s
        draw.ellipse([x - 0.05 * s, 0.45 * s, x + 0.05 * s, 0.55 * s], fill=MARK)


MARKS = {TrayMode.PAUSED: _mark_pause, TrayMode.YIELDING: _mark_yield,
         TrayMode.ERROR: _mark_error, TrayMode.STARTING: _mark_starting}


def draw_icon(view: TrayView, size: int = 64) -> Image.Image:
    """The icon for a view, RGBA, size x size (drawn 4x larger and scaled down for smooth edges)."""
    s = size * 4
    look = LOOKS[view.mode]
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    pad, rim = 0.06 * s, max(2, int(0.07 * s))
    box = [pad, pad, s - pad, s - pad]
    draw.rounded_rectangle(box, radius=0.2 * s, fill=INSIDE)
    inner_top, inner_bottom = pad + rim, s - pad - rim
    height = inner_bottom - inner_top
    others = view.others_fraction
    if others > 0:
        draw.rectangle([pad + rim, inner_top, s - pad - rim, inner_top + others * height], fill=OTHERS)
    level = _water_level(view)
    if level > 0:
        surface = inner_bottom - level * height
        draw.rectangle([pad + rim, surface, s - pad - rim, inner_bottom], fill=look.water)
        # A crest on the surface reads as water rather than a bar chart.
        draw.ellipse([pad + rim, surface - 0.05 * s, s / 2, surface + 0.05 * s], fill=look.water)
    draw.rounded_rectangle(box, radius=0.2 * s, outline=look.rim, width=rim)
    mark = MARKS.get(view.mode)
    if mark is not None:
        mark(draw, s)
    return image.resize((size, size), Image.LANCZOS)
