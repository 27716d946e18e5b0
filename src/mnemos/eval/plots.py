"""Figures from evaluation results (matplotlib, imported only here and only when a figure is drawn).

Each task draws its own figures (:meth:`EvalTask.figures <mnemos.eval.registry.EvalTask.figures>`, in its module
of :mod:`mnemos.eval.tasks`: S-NIAH's accuracy heat-map, MQAR's accuracy against state size) and may add panels to
the one figure the length-swept tasks share (:meth:`EvalTask.length_panels
<mnemos.eval.registry.EvalTask.length_panels>`): :func:`plot_accuracy_vs_length`, accuracy against context length,
one line per model, one panel per task setting (S-NIAH kinds averaged over depth, BABILong tasks, passkey capacity
with its threshold). :func:`make_figures` draws them all; adding a task needs no edit here.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so no global backend is touched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from mnemos.eval.registry import TASKS
from mnemos.eval.results import EvalResults
from mnemos.eval.tables import Pooled, fmt_length

__all__ = ["LengthPanel", "figure", "grid", "make_figures", "panel_axes", "plot_accuracy_vs_length", "save"]

_DPI = 110
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DASHES = ("-", "--", ":", "-.")


class LengthPanel(NamedTuple):
    """One panel of :func:`plot_accuracy_vs_length`: pooled points with a ``"length"`` param, an optional
    threshold line."""

    title: str
    points: list[Pooled]
    threshold: float | None = None


def figure(width: float, height: float):
    """A ``matplotlib.figure.Figure`` (constrained layout), or an ImportError saying what to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib (pip install 'mnemos[plots]'); the results JSON and markdown do not"
        ) from e
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels."""
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def panel_axes(fig, rows: int, cols: int, n: int) -> list:
    """The first ``n`` axes of a ``rows`` x ``cols`` grid on ``fig``, row by row; the rest are hidden."""
    axes = [ax for row in fig.subplots(rows, cols, squeeze=False) for ax in row]
    for ax in axes[n:]:
        ax.set_axis_off()
    return axes[:n]


def save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (parents created); its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_accuracy_vs_length(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """Accuracy vs context length (log scale), a line per model, a panel per :class:`LengthPanel` the registered
    tasks give; refused lengths marked x on the axis. None when no task gives a panel."""
    panels = [panel for task in TASKS.values() for panel in task.length_panels(results)]
    if not panels:
        return None
    rows, cols = grid(len(panels))
    fig = figure(4.2 * cols, 3.2 * rows)
    for ax, (title, points, threshold) in zip(panel_axes(fig, rows, cols, len(panels)), panels, strict=True):
        lengths = sorted({p.params["length"] for p in points})
        for m_i, model in enumerate(dict.fromkeys(p.model for p in points)):
            color = f"C{m_i % 10}"
            mine = sorted((p for p in points if p.model == model), key=lambda p: p.params["length"])
            ran = [p for p in mine if p.status == "ok"]
            # marker and dash differ per model too, so lines that coincide (all at 0 or 1) stay distinguishable
            ax.plot([p.params["length"] for p in ran], [p.accuracy for p in ran], color=color, label=model,
                    marker=_MARKERS[m_i % len(_MARKERS)], ms=7 - 1.5 * (m_i % 3), mfc="none",
                    ls=_DASHES[m_i % len(_DASHES)])
            refused = [p.params["length"] for p in mine if p.status != "ok"]
            if refused:
                ax.plot(refused, [-0.04] * len(refused), ls="none", marker="x", color=color, ms=6, clip_on=False,
                        label=f"{model}: refused")
        if threshold is not None:
            ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"{threshold:g}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [fmt_length(L) for L in lengths], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(-0.06, 1.04)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def make_figures(results: EvalResults, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure the results support, as PNGs in ``out_dir``: each registered task's own (in registration order:
    ``mqar_state_size.png``, ``niah_heatmap.png``), then ``accuracy_vs_length.png``."""
    out = Path(out_dir)
    made = [path for task in TASKS.values() for path in task.figures(results, out)]
    shared = plot_accuracy_vs_length(results, out / "accuracy_vs_length.png")
    return made + ([shared] if shared is not None else [])
