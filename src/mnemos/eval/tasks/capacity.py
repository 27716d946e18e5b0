"""Passkey state capacity (:class:`~mnemos.data.PasskeyCapacityConfig`): passkey exact match per length; the
report adds the longest length at >= the threshold (:func:`mnemos.eval.tables.capacity_summary`); a panel with the
threshold in the accuracy-vs-length figure."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from mnemos.data import NIAHSample, PasskeyCapacityConfig
from mnemos.eval.plots import LengthPanel
from mnemos.eval.registry import ints_arg
from mnemos.eval.results import EvalResults
from mnemos.eval.runner import EvalOptions, GenerationTask
from mnemos.eval.tables import Notes, Pooled, acc, capacity_summary, fmt_length, model_names, pool, table

__all__ = ["CAPACITY", "CapacityTask"]


class CapacityTask(GenerationTask):
    name = "capacity"
    config_type = PasskeyCapacityConfig
    help = "passkey accuracy per length; longest length at >= 95%%"

    def tokens(self, config: PasskeyCapacityConfig, options: EvalOptions) -> int:
        return sum(config.lengths) * config.samples_per_length

    def grid(self, config: PasskeyCapacityConfig) -> Iterable[tuple[dict[str, Any], PasskeyCapacityConfig]]:
        for length in config.lengths:
            yield {"length": length}, dataclasses.replace(config, lengths=(length,))

    def samples(self, config: PasskeyCapacityConfig, seed: int) -> Sequence[NIAHSample]:
        (samples,) = config.build(seed).values()  # {length: samples} of the one length
        return samples

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = {f.name: f.default for f in fields(PasskeyCapacityConfig)}
        parser.add_argument("--lengths", type=ints_arg, default=d["lengths"], help="context lengths in tokens")
        parser.add_argument("--samples", type=int, default=d["samples_per_length"],
                            help="per length (default %(default)s)")
        parser.add_argument("--threshold", type=float, default=0.95,
                            help="accuracy the summary asks for (default %(default)s)")

    def from_args(self, args: argparse.Namespace) -> PasskeyCapacityConfig:
        return PasskeyCapacityConfig(lengths=args.lengths, samples_per_length=args.samples)

    def eval_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"capacity_threshold": args.threshold}

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        points = pool(results, self.name)
        if not points:
            return []
        lengths = sorted({p.params["length"] for p in points})
        look = {(p.model, p.params["length"]): p for p in points}
        summary = capacity_summary(results)
        threshold = _threshold(points)
        rows = []
        for m in model_names(points):
            best = summary.get(m)
            rows.append([m] + [notes.mark(look.get((m, L)), acc) for L in lengths]
                        + [fmt_length(best) if best is not None else "none"])
        return ["## Passkey state capacity", "",
                f"Passkey accuracy per context length; the last column is the longest length up to which accuracy "
                f"stays >= {threshold:g}.", "",
                *table(["model"] + [fmt_length(L) for L in lengths] + [f"longest >= {threshold:g}"], rows), ""]

    def length_panels(self, results: EvalResults) -> list[LengthPanel]:
        points = pool(results, self.name)
        return [LengthPanel("passkey capacity", points, _threshold(points))] if points else []


def _threshold(points: Sequence[Pooled]) -> float:
    """The accuracy the summary asks for (the cells' ``capacity_threshold`` option)."""
    return points[0].cells[0].options.get("capacity_threshold", 0.95)


CAPACITY = CapacityTask()
