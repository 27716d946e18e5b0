"""Figures from evaluation results (matplotlib, imported only here and only when a figure is drawn).

- :func:`plot_niah_heatmap`: S-NIAH accuracy over context length x needle depth, one panel per model and kind.
- :func:`plot_accuracy_vs_length`: accuracy against context length, one line per model, one panel per task
  (S-NIAH kinds averaged over depth, BABILong tasks, passkey capacity with its threshold).
- :func:`plot_mqar_state_size`: MQAR accuracy against the state size each model carries per sequence (Zoology's
  figure), one panel per (L, K), when the results hold at least two state sizes.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so no global backend is touched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mnemos.eval.results import EvalResults
from mnemos.eval.tables import Pooled, fmt_length, pool

__all__ = ["make_figures", "plot_accuracy_vs_length", "plot_mqar_state_size", "plot_niah_heatmap"]

_DPI = 110
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DASHES = ("-", "--", ":", "-.")


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib (pip install 'mnemos[plots]'); the results JSON and markdown do not"
        ) from e
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_niah_heatmap(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """Accuracy heat-map (depth rows x length columns) per (model, kind); refused cells grey. None if no NIAH."""
    points = pool(results, "niah")
    if not points:
        return None
    panels = list(dict.fromkeys((p.model, p.params["kind"]) for p in points))
    rows, cols = _grid(len(panels))
    lengths = sorted({p.params["length"] for p in points})
    depths = sorted({p.params["depth"] for p in points})
    fig = _figure(1.2 + 0.75 * len(lengths) * cols + 1.0, 0.9 + 0.42 * len(depths) * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    look = {(p.model, p.params["kind"], p.params["length"], p.params["depth"]): p for p in points}
    import numpy as np

    image = None
    for k, (model, kind) in enumerate(panels):
        ax = axes[k // cols][k % cols]
        grid = np.full((len(depths), len(lengths)), np.nan)
        labels = [[""] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                p = look.get((model, kind, L, d))
                if p is None:
                    continue
                if p.status == "ok":
                    grid[i, j] = p.accuracy
                    labels[i][j] = f"{p.accuracy:.2f}"
                else:
                    labels[i][j] = "ref" if p.status == "refused" else "err"
        ax.set_facecolor("#d0d0d0")
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto",
                          origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if labels[i][j]:
                    ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [fmt_length(L) for L in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(f"{model} · {kind}", fontsize=9)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("S-NIAH: exact-match accuracy", fontsize=10)
    return _save(fig, path)


def _length_panels(results: EvalResults) -> list[tuple[str, list[Pooled], float | None]]:
    """(title, pooled points with a "length" param, threshold line) for each length-swept task present."""
    panels = []
    niah = pool(results, "niah")
    for kind in dict.fromkeys(p.params["kind"] for p in niah):
        # average the depths of a (model, length) into one point
        merged: dict[tuple[str, int], Pooled] = {}
        for p in niah:
            if p.params["kind"] != kind:
                continue
            key = (p.model, p.params["length"])
            merged.setdefault(key, Pooled(p.model, "niah", {"length": p.params["length"]})).cells.extend(p.cells)
        panels.append((f"S-NIAH {kind} (mean over depths)", list(merged.values()), None))
    babilong = pool(results, "babilong")
    for qa in dict.fromkeys(p.params["qa"] for p in babilong):
        panels.append((f"BABILong {qa}", [p for p in babilong if p.params["qa"] == qa], None))
    capacity = pool(results, "capacity")
    if capacity:
        threshold = capacity[0].cells[0].options.get("capacity_threshold", 0.95)
        panels.append(("passkey capacity", capacity, threshold))
    return panels


def plot_accuracy_vs_length(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """Accuracy vs context length (log scale), a line per model; refused lengths marked x on the axis."""
    panels = _length_panels(results)
    if not panels:
        return None
    rows, cols = _grid(len(panels))
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, (title, points, threshold) in enumerate(panels):
        ax = axes[k // cols][k % cols]
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
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    return _save(fig, path)


def plot_mqar_state_size(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """MQAR accuracy vs per-sequence state size (numbers, log scale), a panel per (L, K), a point per model.

    Models of one family (same ``variant``, or same class) are joined by a line in order of state size. None when
    the results hold fewer than two distinct state sizes (nothing to compare) or no MQAR.
    """
    points = [p for p in pool(results, "mqar") if p.status == "ok" and (p.metric_max("state_numel") or 0) > 0]
    if len({p.metric_max("state_numel") for p in points}) < 2:
        return None
    configs = sorted({(p.params["seq_len"], p.params["num_kv_pairs"]) for p in points})
    rows, cols = _grid(len(configs))
    fig = _figure(4.2 * cols, 3.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)

    def family(p: Pooled) -> str:
        d = p.cells[0].model
        return str(d.get("variant") or d.get("family") or d.get("class") or p.model)

    families = list(dict.fromkeys(family(p) for p in points))
    for k, (L, K) in enumerate(configs):
        ax = axes[k // cols][k % cols]
        mine = [p for p in points if (p.params["seq_len"], p.params["num_kv_pairs"]) == (L, K)]
        for f_i, fam in enumerate(families):
            pts = sorted((p for p in mine if family(p) == fam), key=lambda p: p.metric_max("state_numel"))
            if not pts:
                continue
            xs, ys = [p.metric_max("state_numel") for p in pts], [p.accuracy for p in pts]
            ax.plot(xs, ys, marker="o", ms=5, color=f"C{f_i % 10}", label=fam)
            for p, x, y in zip(pts, xs, ys, strict=True):
                if p.model != fam:
                    ax.annotate(p.model, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(-0.04, 1.04)
        ax.set_xlabel("state size (numbers per sequence)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(f"MQAR L={L} K={K}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(configs), rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    return _save(fig, path)


def make_figures(results: EvalResults, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure the results support, as PNGs in ``out_dir``: ``niah_heatmap.png``,
    ``accuracy_vs_length.png``, ``mqar_state_size.png``."""
    out = Path(out_dir)
    made = [
        plot_niah_heatmap(results, out / "niah_heatmap.png"),
        plot_accuracy_vs_length(results, out / "accuracy_vs_length.png"),
        plot_mqar_state_size(results, out / "mqar_state_size.png"),
    ]
    return [p for p in made if p is not None]
