"""Points drawn on an image the way a reader needs them (the overlays of :mod:`spinemm.viz`).

A point's marker says its side (circle: central, square: left, diamond: right), its style says
whether it is predicted (hollow, coloured) or a recorded label point (white, filled), and a point
that lies outside its image is drawn as an ``X`` at the nearest edge, its label saying where it
really is: never silently off the picture or in the white space beside it. Labels are placed one
by one at the first nearby spot where they cover no other label or marker, so dense findings (the
two foramina of a level, five spinal levels a few pixels apart) stay readable.

Only the axes given are drawn on; matplotlib is imported by the caller (:mod:`spinemm.viz`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SIDE_MARKERS", "Mark", "draw_marks", "inside_image", "legend_handles", "side_of"]

#: Marker per side: central findings (spinal canal) a circle, left a square, right a diamond.
SIDE_MARKERS: dict[str | None, str] = {None: "o", "L": "s", "R": "D"}
_LABEL_POINTS = 7.0  # one step of label offset from its point, in typographic points
#: Label offsets tried in order (in steps): the four diagonals, then straight out, then further.
_CANDIDATES = [(dx * r, dy * r) for r in (1, 2, 3, 4, 5, 6, 8, 10)
               for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1.4), (0, -1.4), (1.4, 0), (-1.4, 0))]


@dataclass(frozen=True)
class Mark:
    """One point on an image, in the image's own pixel coordinates (column ``x``, row ``y``)."""

    x: float
    y: float
    label: str
    color: str
    recorded: bool = False  # a recorded label point, not a prediction
    side: str | None = None  # "L", "R", or None for a central finding


def side_of(condition: str) -> str | None:
    """``"L"``, ``"R"`` or None (central) for a condition key such as ``left_subarticular_stenosis``."""
    return "L" if condition.startswith("left_") else "R" if condition.startswith("right_") else None


def inside_image(x: float, y: float, shape: tuple[int, ...]) -> bool:
    """Whether pixel coordinates ``(x, y)`` (pixel centres at integers) lie on an image of
    ``shape`` ``[..., H, W]``."""
    h, w = shape[-2:]
    return bool(np.isfinite(x) and np.isfinite(y) and -0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5)


def draw_marks(ax: Any, marks: list[Mark], shape: tuple[int, ...]) -> list[Any]:
    """Draw ``marks`` on ``ax`` (already showing an image of ``shape``), keep the view on the
    image and place every label clear of the others; returns the label ``Text`` artists."""
    h, w = shape[-2:]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)  # fixed before drawing: a far point must not widen the view
    anchors, texts = [], []
    for mark in marks:
        outside = not inside_image(mark.x, mark.y, shape)
        x, y = (float(np.clip(np.nan_to_num(mark.x), 0, w - 1)), float(np.clip(np.nan_to_num(mark.y), 0, h - 1)))
        if outside:
            ax.scatter([x], [y], marker="X", s=110, color=mark.color, edgecolors="black", linewidths=0.8, zorder=5,
                       clip_on=False)
            label = f"{mark.label} outside".strip()  # where it really is: the caller's list says
        elif mark.recorded:
            ax.scatter([x], [y], marker=SIDE_MARKERS[mark.side], s=30, facecolors="white", edgecolors="black",
                       linewidths=0.8, zorder=4)
            label = mark.label
        else:
            ax.scatter([x], [y], marker=SIDE_MARKERS[mark.side], s=80, facecolors="none", edgecolors=mark.color,
                       linewidths=2.0, zorder=3)
            label = mark.label
        anchors.append((x, y))
        texts.append((label, "white" if mark.recorded else mark.color))
    ax.apply_aspect()  # the final data-to-pixel scale, so the overlap tests below hold in the saved figure
    renderer = ax.figure.canvas.get_renderer()
    taken = [_marker_box(ax, anchor) for anchor in anchors]
    frame = ax.get_window_extent(renderer)
    placed = []
    backing = {"boxstyle": "round,pad=0.12", "facecolor": "black", "alpha": 0.55, "linewidth": 0}  # readable on any tissue
    for anchor, (label, color) in zip(anchors, texts, strict=True):
        if not label:
            continue
        best = None
        for dx, dy in _CANDIDATES:
            far = abs(dx) > 1.5 or abs(dy) > 1.5
            text = ax.annotate(label, anchor, xytext=(dx * _LABEL_POINTS, dy * _LABEL_POINTS),
                               textcoords="offset points", fontsize=7, color=color, bbox=backing,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center",
                               va="bottom" if dy > 0 else "top" if dy < 0 else "center", zorder=6,
                               annotation_clip=False,
                               arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6} if far else None)
            box = _text_box(text, renderer)
            # covered labels or markers, plus any part outside the image (a neighbour's panel, a title)
            cover = sum(_overlap(box, other) for other in taken) + box.width * box.height - _overlap(box, frame)
            if best is None or cover < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cover, text, box)
            else:
                text.remove()
            if cover == 0:
                break
        taken.append(best[2])
        placed.append(best[1])
    return placed


def legend_handles() -> list[Any]:
    """Figure-legend entries that explain :func:`draw_marks`' markers."""
    from matplotlib.lines import Line2D

    def handle(marker: str, label: str, face: str = "none", edge: str = "#555555", size: float = 8) -> Any:
        return Line2D([], [], linestyle="", marker=marker, markersize=size, markerfacecolor=face,
                      markeredgecolor=edge, markeredgewidth=1.6, label=label)

    return [handle("o", "predicted point (hollow; colour: grade or condition)"),
            handle("o", "recorded label point (white)", face="white", edge="black", size=6),
            handle("o", "central: spinal canal"), handle("s", "left side (L)"), handle("D", "right side (R)"),
            handle("X", "outside the image: drawn at its edge", face="#555555", edge="black")]


def _text_box(text: Any, renderer: Any) -> Any:
    from matplotlib.text import Text

    text.update_positions(renderer)  # an annotation finds its place in pixels only when drawn
    return Text.get_window_extent(text, renderer)  # the words only, not the leader line


def _marker_box(ax: Any, anchor: tuple[float, float]) -> Any:
    from matplotlib.transforms import Bbox

    x, y = ax.transData.transform(anchor)
    r = 5.0 * ax.figure.dpi / 72  # about a marker's half width
    return Bbox.from_extents(x - r, y - r, x + r, y + r)


def _overlap(a: Any, b: Any) -> float:
    """Area shared by two display-space boxes (0 when they only touch)."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)
