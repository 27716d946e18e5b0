"""Reports: merge result files and write them out as ``results.json``, ``report.md`` (the tables of
:mod:`mnemos.eval.tables`, cells pooled over seeds) and the figures of :mod:`mnemos.eval.plots`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from mnemos.eval.plots import make_figures
from mnemos.eval.results import EvalResults
from mnemos.eval.tables import markdown_report

__all__ = ["merge_results", "report", "write_report"]


def merge_results(results: Iterable[EvalResults]) -> EvalResults:
    results = list(results)
    if not results:
        raise ValueError("nothing to merge")
    return results[0].merge(*results[1:])


def write_report(results: EvalResults, out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
    """Write ``results.json``, ``report.md`` and (``plots``) the PNG figures into ``out_dir``; return the paths.

    JSON and markdown are written first, so a missing matplotlib (ImportError) loses only the figures.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [results.save(out / "results.json")]
    md = out / "report.md"
    md.write_text(markdown_report(results))
    written.append(md)
    if plots:
        written += make_figures(results, out)
    return written


def report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
    """What ``mnemos report`` does: load result files, merge them, and :func:`write_report` the comparison."""
    if not paths:
        raise ValueError("give at least one results JSON file")
    merged = merge_results(EvalResults.load(p) for p in paths)
    return write_report(merged, out_dir, plots=plots)
