"""BABILong-style (:class:`~mnemos.data.BABILongConfig`): bAbI qa1-3 stories in a haystack, greedy decoding after
the prompt, exact match; one cell per length; a panel per bAbI task in the accuracy-vs-length figure."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from mnemos.data import BABILongConfig
from mnemos.eval.plots import LengthPanel
from mnemos.eval.registry import ints_arg
from mnemos.eval.results import EvalResults
from mnemos.eval.runner import EvalOptions, GenerationTask
from mnemos.eval.tables import Notes, acc, fmt_length, model_names, pool, table

__all__ = ["BABILONG", "BABILongTask"]


class BABILongTask(GenerationTask):
    name = "babilong"
    config_type = BABILongConfig
    help = "bAbI qa1-3 stories in a haystack: accuracy by length"

    def tokens(self, config: BABILongConfig, options: EvalOptions) -> int:
        return sum(config.lengths) * config.samples_per_length

    def grid(self, config: BABILongConfig) -> Iterable[tuple[dict[str, Any], BABILongConfig]]:
        for length in config.lengths:
            yield {"qa": config.task, "length": length}, dataclasses.replace(config, lengths=(length,))

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = {f.name: f.default for f in fields(BABILongConfig)}
        parser.add_argument("--qa", choices=("qa1", "qa2", "qa3"), default=d["task"], help="(default %(default)s)")
        parser.add_argument("--lengths", type=ints_arg, default=d["lengths"], help="context lengths in tokens")
        parser.add_argument("--samples", type=int, default=d["samples_per_length"],
                            help="per length (default %(default)s)")
        parser.add_argument("--num-facts", type=int, default=None,
                            help="story sentences (default: 6, 10, 14 for qa1-3)")
        parser.add_argument("--corpus", action="append", default=[], metavar="PATH", help="haystack text")

    def from_args(self, args: argparse.Namespace) -> BABILongConfig:
        return BABILongConfig(task=args.qa, lengths=args.lengths, samples_per_length=args.samples,
                              num_facts=args.num_facts, corpus_paths=tuple(args.corpus))

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        points = pool(results, self.name)
        if not points:
            return []
        lengths = sorted({p.params["length"] for p in points})
        look = {(p.model, p.params["qa"], p.params["length"]): p for p in points}
        rows = []
        for qa in dict.fromkeys(p.params["qa"] for p in points):
            for m in model_names([p for p in points if p.params["qa"] == qa]):
                rows.append([m, qa] + [notes.mark(look.get((m, qa, L)), acc) for L in lengths])
        return ["## BABILong", "", "Exact-match accuracy of the one-word answer.", "",
                *table(["model", "task"] + [fmt_length(L) for L in lengths], rows), ""]

    def length_panels(self, results: EvalResults) -> list[LengthPanel]:
        points = pool(results, self.name)
        return [LengthPanel(f"BABILong {qa}", [p for p in points if p.params["qa"] == qa])
                for qa in dict.fromkeys(p.params["qa"] for p in points)]


BABILONG = BABILongTask()
