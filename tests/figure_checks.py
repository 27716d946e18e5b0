"""Checks on drawn figures, for the tests of every module that plots: tick labels that overlap, measured with
matplotlib's own text extents (``Text.get_window_extent`` under the Agg renderer, after a full draw, so the layout
engine has run).

Written apart from the plotting code on purpose: it re-derives which labels a drawing shows instead of asking the
code it checks.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


def _drawn(fig):
    """Draw ``fig`` on an Agg canvas (the one it has, or a new one); the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def shown_tick_labels(axis) -> list:
    """The tick labels a drawing of ``axis`` shows: major and minor, non-empty, visible, at a tick inside the view
    interval (matplotlib positions labels for ticks just outside the view too, and does not draw them)."""
    if not axis.get_visible():
        return []
    transform = axis.get_transform()
    lo, hi = np.sort(transform.transform(np.sort(axis.get_view_interval())))
    tol = 1e-9 * max(abs(hi - lo), 1e-300)
    labels = []
    for locs, ticks in ((axis.get_majorticklocs(), axis.get_major_ticks),
                        (axis.get_minorticklocs(), axis.get_minor_ticks)):
        for loc, tick in zip(locs, ticks(len(locs)), strict=True):
            at = transform.transform(np.array([loc]))[0]
            if not lo - tol <= at <= hi + tol:
                continue
            labels += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text().strip()]
    return labels


def _overlap(a, b, tol: float) -> bool:
    """Whether two bounding boxes share an area wider and taller than ``tol`` pixels."""
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tol) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tol)


def tick_label_overlaps(fig, tol: float = 0.5) -> list[str]:
    """Every pair of shown tick labels of one axis (x or y, of each axes of ``fig``, colorbars included) whose text
    extents overlap, as lines naming the axes, the axis and both labels; empty when none do."""
    renderer = _drawn(fig)
    problems = []
    for n, ax in enumerate(fig.axes):
        if not (ax.get_visible() and ax.axison):
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = shown_tick_labels(axis)
            boxes = [label.get_window_extent(renderer) for label in labels]
            for i in range(len(labels)):
                for j in range(i + 1, len(labels)):
                    if _overlap(boxes[i], boxes[j], tol):
                        problems.append(f"axes {n} ({ax.get_title() or ax.get_label() or 'untitled'}) {name}: "
                                        f"{labels[i].get_text()!r} overlaps {labels[j].get_text()!r}")
    return problems


def assert_no_tick_label_overlap(fig) -> None:
    problems = tick_label_overlaps(fig)
    assert not problems, f"{len(problems)} overlapping tick label pairs:\n" + "\n".join(problems[:20])


@contextmanager
def saved_figures():
    """Collects every ``matplotlib.figure.Figure`` saved inside the block (pyplot's or a bare ``Figure``), in
    order; each is still saved."""
    from matplotlib.figure import Figure

    figures, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = savefig
    try:
        yield figures
    finally:
        Figure.savefig = original
