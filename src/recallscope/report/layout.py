"""Checks a figure gets before it is saved: does it show anything, and do legends cover titles or data.

Both read matplotlib's own objects and layout (no pixels):

- :func:`blank_reason`: every value the axes draw (lines, images, bars, scatter points, filled
  bands) is 0 or missing, so the figure carries no information and the report says so instead;
- :func:`place_legends`: a legend that overlaps its axes' title, the figure's title, any drawn point
  or other axes is moved (matplotlib's best spot, else outside to the right, else below);
  :func:`overlaps` lists what still overlaps (the tests ask for nothing).
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import Collection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox

__all__ = ["blank_reason", "place_legends", "overlaps"]


def _values(ax: Axes) -> list[np.ndarray]:
    """Every data value ``ax`` draws (y values of lines and points, image cells, bar heights)."""
    found = []
    for line in ax.get_lines():
        found.append(np.asarray(line.get_ydata(), dtype=float))
    for image in ax.get_images():
        found.append(np.ma.filled(np.ma.asarray(image.get_array(), dtype=float), np.nan).ravel())
    for patch in ax.patches:
        if isinstance(patch, Rectangle):
            found.append(np.array([patch.get_height()], dtype=float))
    for collection in ax.collections:
        offsets = np.asarray(collection.get_offsets(), dtype=float)
        if offsets.size:
            found.append(offsets[:, 1])
        array = collection.get_array()
        if array is not None:
            found.append(np.ma.filled(np.ma.asarray(array, dtype=float), np.nan).ravel())
        for path in collection.get_paths():
            found.append(np.asarray(path.vertices, dtype=float)[:, 1])
    return found


def blank_reason(fig: Figure) -> str:
    """Why ``fig`` carries no information ('' when it does): no value, or every value 0 or missing."""
    values = [v for ax in fig.axes if ax.get_visible() for v in _values(ax)]
    flat = np.concatenate(values) if values else np.zeros(0)
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return "every value is missing"
    if np.all(finite == 0):
        return "every value is 0"
    return ""


def _drawn_points(ax: Axes) -> np.ndarray:
    """Display coordinates ``[n, 2]`` of the points ``ax`` draws (lines and scatter points)."""
    points = []
    for artist in ax.get_lines():
        if isinstance(artist, Line2D) and artist.get_visible():
            xy = np.column_stack(
                [np.asarray(artist.get_xdata(), float), np.asarray(artist.get_ydata(), float)]
            )
            points.append(artist.get_transform().transform(xy))
    for collection in ax.collections:
        if isinstance(collection, Collection) and np.asarray(collection.get_offsets()).size:
            points.append(
                collection.get_offset_transform().transform(np.asarray(collection.get_offsets(), float))
            )
    good = [p[np.all(np.isfinite(p), axis=1)] for p in points]
    return np.concatenate(good) if good else np.zeros((0, 2))


def _problems(fig: Figure, ax: Axes, renderer) -> list[str]:
    legend = ax.get_legend()
    if legend is None or not legend.get_visible():
        return []
    box = legend.get_window_extent(renderer)
    legend_texts = {id(t) for t in legend.findobj(Text)}
    name = repr(ax.get_title())
    found = [
        f"legend over a title next to {name}"
        for t, extent in zip(*_text_boxes(fig, ax, renderer), strict=True)
        if id(t) not in legend_texts and box.overlaps(extent)
    ]
    points = _drawn_points(ax)
    x, y = points[:, 0], points[:, 1]
    inside = (x >= box.x0) & (x <= box.x1) & (y >= box.y0) & (y <= box.y1)
    if inside.any():
        found.append(f"legend over {int(inside.sum())} drawn points of {name}")
    others = [o for o in fig.axes if o is not ax and o.get_visible()]
    found += [
        f"legend of {name} over other axes" for o in others if box.overlaps(o.get_window_extent(renderer))
    ]
    return found


def _text_boxes(fig: Figure, ax: Axes, renderer) -> tuple[list[Text], list[Bbox]]:
    texts = [ax.title] + [t for t in fig.findobj(Text) if t.axes is None]
    texts = [t for t in texts if t.get_text() and t.get_visible()]
    return texts, [t.get_window_extent(renderer) for t in texts]


def overlaps(fig: Figure, *, drawn: bool = False) -> list[str]:
    """What legends of ``fig`` cover (titles, drawn points, other axes) and which axes' titles run
    into each other, as sentences; empty when nothing. ``drawn``: the canvas shows ``fig`` as it is
    (right after :func:`place_legends`), so it is not drawn again.
    """
    renderer = fig.canvas.get_renderer()
    if not drawn:
        fig.canvas.draw()
    found = [problem for ax in fig.axes for problem in _problems(fig, ax, renderer)]
    titled = [ax for ax in fig.axes if ax.get_title() and ax.get_visible()]
    for i, a in enumerate(titled):
        for b in titled[i + 1 :]:
            if a.title.get_window_extent(renderer).overlaps(b.title.get_window_extent(renderer)):
                found.append(f"titles {a.get_title()!r} and {b.get_title()!r} overlap")
    return found


_PLACES = (("best", None), ("upper left", (1.02, 1.0)), ("upper center", (0.5, -0.16)))
"""Where a legend that covers something is tried next: matplotlib's best spot inside the axes, outside
to the right, below."""


def place_legends(fig: Figure) -> None:
    """Move every legend that covers a title, drawn points or other axes to the first of
    :data:`_PLACES` where it covers nothing (else the last tried). The canvas is left drawn as
    the figure ends up.
    """
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    for ax in fig.axes:
        if not _problems(fig, ax, renderer):
            continue
        legend = ax.get_legend()
        for loc, anchor in _PLACES:
            legend.set_loc(loc)
            legend.set_bbox_to_anchor(anchor, transform=None if anchor is None else ax.transAxes)
            fig.canvas.draw()
            if not _problems(fig, ax, renderer):
                break
