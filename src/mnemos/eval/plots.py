"""Figures from evaluation results (matplotlib, imported only here and only when a figure is drawn).

Each task draws its own figures (:meth:`EvalTask.figures <mnemos.eval.registry.EvalTask.figures>`, in its module
of :mod:`mnemos.eval.tasks`: S-NIAH's accuracy heat-map, MQAR's accuracy against state size) and may add panels to
the one figure the length-swept tasks share (:meth:`EvalTask.length_panels
<mnemos.eval.registry.EvalTask.length_panels>`): :func:`plot_accuracy_vs_length`, accuracy against context length,
one line per model, one panel per task setting (S-NIAH kinds averaged over depth, BABILong tasks, passkey capacity
with its threshold). :func:`make_figures` draws them all; adding a task needs no edit here.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so no global backend is touched.
:func:`save` thins crowded tick labels (:func:`thin_tick_labels`), so no figure overlaps them at any number of grid
points.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from mnemos.eval.jrt import JRT_SUFFIX
from mnemos.eval.registry import TASKS
from mnemos.eval.results import EvalResults
from mnemos.eval.tables import Pooled, fmt_length, pool, si

__all__ = ["LengthPanel", "bytes_panels", "figure", "figure_legend", "grid", "log_ticks", "make_figures",
           "panel_axes", "plot_accuracy_vs_length", "plot_accuracy_vs_state_bytes", "policy_family", "save",
           "thin_tick_labels"]

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


def figure_legend(fig, fontsize: float = 7) -> None:
    """One legend for all the panels of ``fig``, outside them on the right, the figure widened to hold it: every
    distinct label of its axes, in order of first appearance. Panels share their models, so a legend in each repeated
    them and, with many models, covered the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    handles: dict = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if not handles:
        return
    per_column = max(1, int(fig.get_figheight() * 72 / (fontsize * 1.9)))  # entries one column holds
    legend = fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=fontsize,
                        ncols=math.ceil(len(handles) / per_column))
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    width = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    fig.set_figwidth(fig.get_figwidth() + width + 0.1)


def save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (parents created), its crowded tick labels thinned first; its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thin_tick_labels(fig)
    fig.savefig(path, format="png")
    return path


def log_ticks(lo: float, hi: float) -> list[float]:
    """Positions for the labelled ticks of a log axis showing ``[lo, hi]`` (``lo > 0``): decades over a wide range,
    1-2-5 steps over a narrower one, every digit (1, 2, ..., 9 x 10^k) below that, and evenly spaced round numbers
    within less than one such step, so that at least two (three where the range allows) land inside. Label them with
    :func:`mnemos.eval.tables.si`; :func:`thin_tick_labels` drops what does not fit."""
    lo, hi = min(lo, hi), max(lo, hi)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for subs, enough in (((1,), 3), ((1, 2, 5), 3), (range(1, 10), 2)):
        ticks = [m * 10.0**d for d in decades for m in subs if lo <= m * 10.0**d <= hi]
        if len(ticks) >= enough:
            return ticks
    from matplotlib.ticker import MaxNLocator

    return [float(t) for t in MaxNLocator(5).tick_values(lo, hi) if lo <= t <= hi]


def thin_tick_labels(fig, gap: float = 3.0) -> None:
    """Blank tick labels of ``fig`` until no two of one axis come closer than ``gap`` pixels (text extents after
    layout): first an axis' minor labels (a log axis labels some over a narrow range), then all but every k-th major
    label, for the smallest k that leaves no overlap, starting from the first. The ticks themselves stay."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    for _ in range(4):  # thinning can change the layout a little: measure again until nothing changes
        fig.draw_without_rendering()
        renderer = fig.canvas.get_renderer()
        changed = False
        for ax in fig.axes:
            if ax.get_visible() and ax.axison:
                for axis in (ax.xaxis, ax.yaxis):
                    changed |= _thin_axis(axis, renderer, gap)
        if not changed:
            return


def _shown_labels(axis, minor: bool) -> list:
    """``(loc, Text)`` of the tick labels a drawing of ``axis`` shows (visible, non-empty, at a tick inside the
    view), in order of position."""
    import numpy as np

    if not axis.get_visible():
        return []
    transform = axis.get_transform()
    lo, hi = np.sort(transform.transform(np.sort(axis.get_view_interval())))
    tol = 1e-9 * max(hi - lo, 1e-300)
    locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    ticks = axis.get_minor_ticks(len(locs)) if minor else axis.get_major_ticks(len(locs))
    shown = []
    for loc, tick in zip(locs, ticks, strict=True):
        if lo - tol <= transform.transform(np.array([loc]))[0] <= hi + tol:
            shown += [(loc, t) for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text().strip()]
    return sorted(shown, key=lambda x: x[0])


def _crowded(boxes: list, gap: float) -> bool:
    """Whether any two boxes come closer than ``gap`` pixels in both directions (overlap, or nearly)."""
    return any(min(a.x1, b.x1) - max(a.x0, b.x0) > -gap and min(a.y1, b.y1) - max(a.y0, b.y0) > -gap
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _thin_axis(axis, renderer, gap: float) -> bool:
    """One step of :func:`thin_tick_labels` on ``axis``; whether it changed anything."""
    minor, major = _shown_labels(axis, True), _shown_labels(axis, False)
    shown = sorted(major + minor, key=lambda x: x[0])
    if not _crowded([t.get_window_extent(renderer) for _, t in shown], gap):
        return False
    if minor:
        from matplotlib.ticker import NullFormatter

        axis.set_minor_formatter(NullFormatter())
        return True
    first: dict = {}  # loc -> its first label (label1 when both sides show one), in order of position
    for loc, text in major:
        first.setdefault(loc, text)
    locs = list(first)
    boxes = [first[loc].get_window_extent(renderer) for loc in locs]
    k = next((k for k in range(2, len(locs)) if not _crowded(boxes[::k], gap)), len(locs))
    axis.set_ticks(locs, [first[loc].get_text() if i % k == 0 else "" for i, loc in enumerate(locs)])
    return True


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
    figure_legend(fig)
    return save(fig, path)


_POOLED_PARAMS = ("depth",)  # params that do not split the accuracy-vs-bytes panels: pooled over (NIAH's depth)
_SHORT = {"seq_len": "L", "num_kv_pairs": "K", "vocab_size": "V"}  # panel titles


_SWEPT = ("budget", "retrieval_ratio", "bits", "pruning_ratio")  # what a KV-policy line runs along, first found


def policy_family(p: Pooled) -> tuple[str, str | None]:
    """``(family, label)`` of a pooled point for the accuracy-vs-bytes figure: a KV-policy run's family is its base
    model and its policy spec without the parameter a sweep runs along (the first of ``budget``,
    ``retrieval_ratio``, ``bits``, ``pruning_ratio`` it sets), so a sweep draws one line, each point labelled with
    that value; any other model is a family of its own, unlabelled."""
    d = p.cells[0].model
    spec = d.get("kv_policy")
    if not spec:
        return p.model, None
    parts = [(name, [x for x in args.split(",") if x]) for name, _, args in (s.partition(":") for s in spec.split("+"))]
    label = None
    for key in _SWEPT:
        for _, items in parts:
            hit = next((x for x in items if x.startswith(key + "=")), None)
            if hit is not None:
                items.remove(hit)
                label = hit.partition("=")[2]
                break
        if label is not None:
            break
    text = "+".join(name + (":" + ",".join(items) if items else "") for name, items in parts)
    base = d.get("base_model", p.model) + (JRT_SUFFIX if d.get("jrt_prompt") else "")  # --jrt: its own family
    return f"{base} + {text}", label


def bytes_panels(results: EvalResults) -> list[tuple[str, list[Pooled]]]:
    """``(title, points)`` per (task, grid point) whose cells record accuracy and ``state_bytes``: NIAH's depths
    pooled into one point per (model, length); the shared-context modes (``mode``; MQAR, NIAH) are panels of their own
    (accuracy over all turns against the state after the last turn / the largest prefill)."""
    panels: dict[tuple, tuple[str, dict[str, Pooled]]] = {}
    for task in TASKS:
        for p in pool(results, task):
            if p.status != "ok" or p.accuracy is None:
                continue
            if not p.metric_max("state_bytes"):
                continue
            key_params = {k: v for k, v in p.params.items() if k not in _POOLED_PARAMS}
            key = (task, tuple(sorted(key_params.items(), key=lambda kv: kv[0])))
            title = f"{task} " + " ".join(f"{_SHORT.get(k, k)}={fmt_length(v) if k == 'length' else v}"
                                          for k, v in key_params.items())
            points = panels.setdefault(key, (title, {}))[1]
            points.setdefault(p.model, Pooled(p.model, task, key_params)).cells.extend(p.cells)
    return [(title, list(points.values())) for title, points in panels.values()]


def plot_accuracy_vs_state_bytes(results: EvalResults, path: str | os.PathLike, max_panels: int = 12) -> Path | None:
    """Accuracy against the state each model carries per sequence, in bytes (log scale), one panel per task grid
    point (:func:`bytes_panels`, at most ``max_panels``): KV-cache policies (a line per base model and policy through
    its budgets, each point labelled with its budget) beside recurrent / neural-memory models and full caches (a
    point each) on the same axes; a sweep of another parameter (DuoAttention's ratio, KIVI's bits, ThinK's ratio)
    draws its line the same way. None unless some cell ran under a KV policy (``model.kv_policy``) and some panel
    has two points of different sizes."""
    if not any(c.model.get("kv_policy") for c in results.cells):
        return None
    panels = [(t, pts) for t, pts in bytes_panels(results)
              if len({p.metric_max("state_bytes") for p in pts}) >= 2][:max_panels]
    if not panels:
        return None
    rows, cols = grid(len(panels))
    fig = figure(4.4 * cols, 3.4 * rows)
    from matplotlib.ticker import NullFormatter  # after figure(): its ImportError says what to install

    families = list(dict.fromkeys(policy_family(p)[0] for _, pts in panels for p in pts))
    for ax, (title, points) in zip(panel_axes(fig, rows, cols, len(panels)), panels, strict=True):
        for f_i, fam in enumerate(families):
            pts = sorted((p for p in points if policy_family(p)[0] == fam), key=lambda p: p.metric_max("state_bytes"))
            if not pts:
                continue
            xs, ys = [p.metric_max("state_bytes") for p in pts], [p.accuracy for p in pts]
            ax.plot(xs, ys, marker=_MARKERS[f_i % len(_MARKERS)], ms=5, color=f"C{f_i % 10}", label=fam,
                    ls=_DASHES[f_i % len(_DASHES)] if len(pts) > 1 else "none")
            for p, x, y in zip(pts, xs, ys, strict=True):
                label = policy_family(p)[1]
                if label is not None:
                    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ticks = log_ticks(lo, hi)
        ax.set_xticks(ticks, [si(t) + "B" for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.04, 1.04)
        ax.set_xlabel("state per sequence (bytes)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    figure_legend(fig)
    return save(fig, path)


def make_figures(results: EvalResults, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure the results support, as PNGs in ``out_dir``: each registered task's own (in registration order:
    ``mqar_state_size.png``, ``mqar_turns.png``, ``niah_heatmap.png``, ``niah_turns.png``), then
    ``accuracy_vs_length.png`` and, when
    some cell ran under a KV policy, ``accuracy_vs_state_bytes.png``."""
    out = Path(out_dir)
    made = [path for task in TASKS.values() for path in task.figures(results, out)]
    shared = plot_accuracy_vs_length(results, out / "accuracy_vs_length.png")
    by_bytes = plot_accuracy_vs_state_bytes(results, out / "accuracy_vs_state_bytes.png")
    return made + [p for p in (shared, by_bytes) if p is not None]
