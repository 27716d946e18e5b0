"""S-NIAH (:class:`~mnemos.data.NIAHConfig`): greedy decoding after the prompt, exact match; one cell per (length,
depth)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from mnemos.data import NIAHConfig
from mnemos.eval.registry import floats_arg, ints_arg
from mnemos.eval.results import EvalResults
from mnemos.eval.runner import EvalOptions, GenerationTask
from mnemos.eval.tables import Notes, acc, fmt_length, freeze, lookup, model_names, pool, table

__all__ = ["NIAH", "NIAHTask"]


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


NIAH = NIAHTask()
