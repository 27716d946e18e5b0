"""S-NIAH (:class:`~mnemos.data.NIAHConfig`): greedy decoding after the prompt, exact match; one cell per (length,
depth). Figures: the accuracy heat-map (:func:`plot_niah_heatmap`) and a panel per kind, averaged over depth, in the
accuracy-vs-length figure."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from mnemos.data import NIAHConfig
from mnemos.eval.plots import LengthPanel, figure, grid, panel_axes, save
from mnemos.eval.registry import floats_arg, ints_arg
from mnemos.eval.results import EvalResults
from mnemos.eval.runner import EvalOptions, GenerationTask
from mnemos.eval.tables import Notes, Pooled, acc, fmt_length, freeze, lookup, model_names, pool, table

__all__ = ["NIAH", "NIAHTask", "plot_niah_heatmap"]


class NIAHTask(GenerationTask):
    name = "niah"
    config_type = NIAHConfig
    help = "single needle in a haystack: accuracy by length and depth"

    def tokens(self, config: NIAHConfig, options: EvalOptions) -> int:
        return sum(config.lengths) * len(config.depths) * config.samples_per_cell

    def grid(self, config: NIAHConfig) -> Iterable[tuple[dict[str, Any], NIAHConfig]]:
        for length in config.lengths:
            for depth in config.depths:
                params = {"kind": config.kind, "length": length, "depth": depth}
                yield params, dataclasses.replace(config, lengths=(length,), depths=(depth,))

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = {f.name: f.default for f in fields(NIAHConfig)}
        parser.add_argument("--kind", choices=("passkey", "number", "uuid"), default=d["kind"],
                            help="(default %(default)s)")
        parser.add_argument("--lengths", type=ints_arg, default=d["lengths"],
                            help="context lengths in tokens, e.g. 1024,4096")
        parser.add_argument("--depths", type=floats_arg, default=d["depths"],
                            help="needle depths in [0, 1], e.g. 0,0.5,1")
        parser.add_argument("--samples", type=int, default=d["samples_per_cell"],
                            help="per (length, depth) (default %(default)s)")
        parser.add_argument("--corpus", action="append", default=[], metavar="PATH", help="haystack text (number/uuid)")

    def from_args(self, args: argparse.Namespace) -> NIAHConfig:
        return NIAHConfig(kind=args.kind, lengths=args.lengths, depths=args.depths, samples_per_cell=args.samples,
                          corpus_paths=tuple(args.corpus))

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        points = pool(results, self.name)
        if not points:
            return []
        out = []
        for kind in dict.fromkeys(p.params["kind"] for p in points):
            pts = [p for p in points if p.params["kind"] == kind]
            lengths = sorted({p.params["length"] for p in pts})
            depths = sorted({p.params["depth"] for p in pts})
            rows = []
            for m in model_names(pts):
                row = [m]
                for L in lengths:
                    cell_pts = [p for p in pts if p.model == m and p.params["length"] == L]
                    ran = [p for p in cell_pts if p.status == "ok"]
                    if ran:
                        row.append(f"{sum(p.accuracy for p in ran) / len(ran):.2f}")
                    else:
                        row.append(notes.mark(cell_pts[0] if cell_pts else None, acc))
                rows.append(row)
            out += [f"## S-NIAH ({kind})", "", "Exact-match accuracy of the greedy answer, mean over depths "
                    f"{', '.join(f'{d:g}' for d in depths)}.", "",
                    *table(["model"] + [fmt_length(L) for L in lengths], rows), ""]
            look = lookup(pts)
            for m in model_names(pts):
                detail = []
                for d in depths:
                    detail.append([f"{d:g}"] + [
                        notes.mark(look.get((m, freeze({"kind": kind, "length": L, "depth": d}))), acc) for L in lengths
                    ])
                out += [f"### {m}: accuracy by depth (rows) and length (columns)", "",
                        *table(["depth"] + [fmt_length(L) for L in lengths], detail), ""]
        return out

    def figures(self, results: EvalResults, out_dir: Path) -> list[Path]:
        path = plot_niah_heatmap(results, out_dir / "niah_heatmap.png")
        return [path] if path is not None else []

    def length_panels(self, results: EvalResults) -> list[LengthPanel]:
        points = pool(results, self.name)
        panels = []
        for kind in dict.fromkeys(p.params["kind"] for p in points):
            # average the depths of a (model, length) into one point
            merged: dict[tuple[str, int], Pooled] = {}
            for p in points:
                if p.params["kind"] != kind:
                    continue
                key = (p.model, p.params["length"])
                merged.setdefault(key, Pooled(p.model, self.name, {"length": p.params["length"]})).cells.extend(p.cells)
            panels.append(LengthPanel(f"S-NIAH {kind} (mean over depths)", list(merged.values())))
        return panels


NIAH = NIAHTask()


def plot_niah_heatmap(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """Accuracy heat-map (depth rows x length columns) per (model, kind); refused cells grey. None if no NIAH."""
    points = pool(results, "niah")
    if not points:
        return None
    panels = list(dict.fromkeys((p.model, p.params["kind"]) for p in points))
    rows, cols = grid(len(panels))
    lengths = sorted({p.params["length"] for p in points})
    depths = sorted({p.params["depth"] for p in points})
    fig = figure(1.2 + 0.75 * len(lengths) * cols + 1.0, 0.9 + 0.42 * len(depths) * rows + 0.6)
    axes = panel_axes(fig, rows, cols, len(panels))
    look = {(p.model, p.params["kind"], p.params["length"], p.params["depth"]): p for p in points}
    import numpy as np

    image = None
    for ax, (model, kind) in zip(axes, panels, strict=True):
        heat = np.full((len(depths), len(lengths)), np.nan)
        labels = [[""] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                p = look.get((model, kind, L, d))
                if p is None:
                    continue
                if p.status == "ok":
                    heat[i, j] = p.accuracy
                    labels[i][j] = f"{p.accuracy:.2f}"
                else:
                    labels[i][j] = "ref" if p.status == "refused" else "err"
        ax.set_facecolor("#d0d0d0")
        image = ax.imshow(np.ma.masked_invalid(heat), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto",
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
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle("S-NIAH: exact-match accuracy", fontsize=10)
    return save(fig, path)
