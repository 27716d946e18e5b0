"""Markdown comparison tables from evaluation results: cells pooled over seeds, one section per task.

Cells that measure the same thing (same model name, task and grid point) are pooled: accuracy is total correct
over total scored, loss is weighted by tokens. So running a model again with another seed and merging the two files
tightens its numbers rather than adding a row. :meth:`EvalResults.markdown <mnemos.eval.results.EvalResults.markdown>`
renders through here; :mod:`mnemos.eval.report` writes the files and :mod:`mnemos.eval.plots` the figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mnemos.data import longest_length_at

if TYPE_CHECKING:  # annotations only: results.py imports this module (EvalResults.markdown)
    from mnemos.eval.results import Cell, EvalResults

__all__ = ["Pooled", "capacity_summary", "fmt_length", "markdown_report", "pool"]


@dataclass
class Pooled:
    """The cells of one (model, task, grid point), pooled over seeds / runs."""

    model: str
    task: str
    params: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)

    @property
    def ok(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "ok"]

    @property
    def status(self) -> str:
        """``"ok"`` if any cell ran, else the status of the first (``"refused"`` / ``"error"``)."""
        return "ok" if self.ok else self.cells[0].status

    @property
    def message(self) -> str | None:
        return None if self.ok else self.cells[0].message

    @property
    def accuracy(self) -> float | None:
        n = sum(c.metrics.get("n", 0) for c in self.ok)
        return sum(c.metrics["correct"] for c in self.ok) / n if n else None

    @property
    def loss(self) -> float | None:
        tokens = sum(c.metrics.get("tokens", 0) for c in self.ok)
        return sum(c.metrics["loss"] * c.metrics["tokens"] for c in self.ok) / tokens if tokens else None

    def rate(self, hits: str, total: str) -> float | None:
        """``sum(metrics[hits]) / sum(metrics[total])`` over the cells that ran (None when nothing was counted, e.g.
        in results written before the metric existed)."""
        cells = [c for c in self.ok if c.metrics.get(hits) is not None and c.metrics.get(total)]
        n = sum(c.metrics[total] for c in cells)
        return sum(c.metrics[hits] for c in cells) / n if n else None

    def metric_max(self, name: str) -> Any:
        vals = [c.metrics[name] for c in self.ok if c.metrics.get(name) is not None]
        return max(vals) if vals else None


def _freeze(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def pool(results: EvalResults, task: str) -> list[Pooled]:
    """The task's cells grouped by (model name, params), in order of first appearance."""
    groups: dict[tuple, Pooled] = {}
    for c in results.of_task(task):
        key = (c.model_name, _freeze(c.params))
        if key not in groups:
            groups[key] = Pooled(c.model_name, task, dict(c.params))
        groups[key].cells.append(c)
    return list(groups.values())


def capacity_summary(results: EvalResults) -> dict[str, int | None]:
    """``{model: longest passkey length with accuracy >= threshold}`` (None if the shortest length misses it).

    Only lengths that ran count (a refused length ends the scan: nothing is claimed beyond it). The threshold is
    the cells' ``capacity_threshold`` option (0.95 unless changed).
    """
    out: dict[str, int | None] = {}
    by_model: dict[str, list[Pooled]] = {}
    for p in pool(results, "capacity"):
        by_model.setdefault(p.model, []).append(p)
    for model, points in by_model.items():
        threshold = points[0].cells[0].options.get("capacity_threshold", 0.95)
        acc: dict[int, float] = {}
        for p in sorted(points, key=lambda p: p.params["length"]):
            if p.accuracy is None:
                break
            acc[p.params["length"]] = p.accuracy
        out[model] = longest_length_at(acc, threshold) if acc else None
    return out


def fmt_length(n: int) -> str:
    """1024 -> "1K", 2097152 -> "2M", 1000 -> "1000"."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(n)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


class _Notes:
    """Footnotes for refused / failed cells: each distinct message numbered once."""

    def __init__(self):
        self.messages: list[str] = []

    def mark(self, p: Pooled | None, value: Callable[[Pooled], str]) -> str:
        if p is None:
            return ""
        if p.status == "ok":
            return value(p)
        msg = p.message or p.status
        if msg not in self.messages:
            self.messages.append(msg)
        return f"{'refused' if p.status == 'refused' else 'error'} [{self.messages.index(msg) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {m}" for i, m in enumerate(self.messages)]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _acc(p: Pooled) -> str:
    return f"{p.accuracy:.2f}"


def _models(points: Sequence[Pooled]) -> list[str]:
    return list(dict.fromkeys(p.model for p in points))


def _lookup(points: Sequence[Pooled]) -> dict[tuple, Pooled]:
    return {(p.model, _freeze(p.params)): p for p in points}


def _section_mqar(results: EvalResults, notes: _Notes) -> list[str]:
    points = pool(results, "mqar")
    if not points:
        return []
    grid = list(dict.fromkeys((p.params["seq_len"], p.params["num_kv_pairs"], p.params["vocab_size"]) for p in points))
    grid.sort()
    by = {(p.model, p.params["seq_len"], p.params["num_kv_pairs"], p.params["vocab_size"]): p for p in points}
    header = ["model", "state (numbers / seq)"] + [f"L={L} K={K}" + (f" V={V}" if len({g[2] for g in grid}) > 1 else "")
                                                  for L, K, V in grid]
    rows = []
    for m in _models(points):
        states = [p.metric_max("state_numel") for p in points if p.model == m and p.metric_max("state_numel")]
        rows.append([m, _si(max(states)) if states else "—"]
                    + [notes.mark(by.get((m, *g)), _acc) for g in grid])
    return ["## MQAR", "", "Teacher-forced accuracy at the query positions (guessing a value token scores 2 / V).", "",
            *_table(header, rows), "", *_mqar_detail(points)]


def _mqar_detail(points: Sequence[Pooled]) -> list[str]:
    """Per (model, L, K): accuracy near / far from the queried key and the share of answers that are a context
    value, beside the levels that tell recall from guessing (1/K, chance)."""
    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}"

    rows = []
    for p in points:
        if p.status != "ok" or p.rate("context_values", "n") is None:
            continue
        reach = p.ok[0].metrics.get("reach")
        V, K = p.params["vocab_size"], p.params["num_kv_pairs"]
        rows.append([p.model, str(p.params["seq_len"]), str(K), "—" if reach is None else str(reach),
                     fmt(p.accuracy), fmt(p.rate("near_correct", "n_near")), fmt(p.rate("far_correct", "n_far")),
                     fmt(p.rate("context_values", "n")), fmt(p.rate("far_context_values", "n_far")), f"{1 / K:.3g}",
                     f"{1 / (V - V // 2):.3f}"])
    if not rows:
        return []
    return ["### MQAR: recall by distance, and answers that are a context value", "",
            "near / far: accuracy at the queries whose key lies at most / more than `reach` tokens back (the reach "
            "of the models' sliding windows, n_layers * (window - 1); — when not split). ctx-value: the share of "
            "answers that are one of the sample's K values, right or wrong (far: of the far queries). A model "
            "answering each query with a random value of its context scores 1/K with ctx-value 1.00; chance is a "
            "uniform guess among the V - V/2 value ids.", "",
            *_table(["model", "L", "K", "reach", "accuracy", "near", "far", "ctx-value", "ctx-value far", "1/K",
                     "chance"], rows), ""]


def _section_niah(results: EvalResults, notes: _Notes) -> list[str]:
    points = pool(results, "niah")
    if not points:
        return []
    out = []
    for kind in dict.fromkeys(p.params["kind"] for p in points):
        pts = [p for p in points if p.params["kind"] == kind]
        lengths = sorted({p.params["length"] for p in pts})
        depths = sorted({p.params["depth"] for p in pts})
        rows = []
        for m in _models(pts):
            row = [m]
            for L in lengths:
                cell_pts = [p for p in pts if p.model == m and p.params["length"] == L]
                ran = [p for p in cell_pts if p.status == "ok"]
                if ran:
                    row.append(f"{sum(p.accuracy for p in ran) / len(ran):.2f}")
                else:
                    row.append(notes.mark(cell_pts[0] if cell_pts else None, _acc))
            rows.append(row)
        out += [f"## S-NIAH ({kind})", "", "Exact-match accuracy of the greedy answer, mean over depths "
                f"{', '.join(f'{d:g}' for d in depths)}.", "",
                *_table(["model"] + [fmt_length(L) for L in lengths], rows), ""]
        look = _lookup(pts)
        for m in _models(pts):
            detail = []
            for d in depths:
                detail.append([f"{d:g}"] + [
                    notes.mark(look.get((m, _freeze({"kind": kind, "length": L, "depth": d}))), _acc) for L in lengths
                ])
            out += [f"### {m}: accuracy by depth (rows) and length (columns)", "",
                    *_table(["depth"] + [fmt_length(L) for L in lengths], detail), ""]
    return out


def _section_babilong(results: EvalResults, notes: _Notes) -> list[str]:
    points = pool(results, "babilong")
    if not points:
        return []
    lengths = sorted({p.params["length"] for p in points})
    look = {(p.model, p.params["qa"], p.params["length"]): p for p in points}
    rows = []
    for qa in dict.fromkeys(p.params["qa"] for p in points):
        for m in _models([p for p in points if p.params["qa"] == qa]):
            rows.append([m, qa] + [notes.mark(look.get((m, qa, L)), _acc) for L in lengths])
    return ["## BABILong", "", "Exact-match accuracy of the one-word answer.", "",
            *_table(["model", "task"] + [fmt_length(L) for L in lengths], rows), ""]


def _section_capacity(results: EvalResults, notes: _Notes) -> list[str]:
    points = pool(results, "capacity")
    if not points:
        return []
    lengths = sorted({p.params["length"] for p in points})
    look = {(p.model, p.params["length"]): p for p in points}
    summary = capacity_summary(results)
    threshold = points[0].cells[0].options.get("capacity_threshold", 0.95)
    rows = []
    for m in _models(points):
        best = summary.get(m)
        rows.append([m] + [notes.mark(look.get((m, L)), _acc) for L in lengths]
                    + [fmt_length(best) if best is not None else "none"])
    return ["## Passkey state capacity", "",
            f"Passkey accuracy per context length; the last column is the longest length up to which accuracy stays "
            f">= {threshold:g}.", "",
            *_table(["model"] + [fmt_length(L) for L in lengths] + [f"longest >= {threshold:g}"], rows), ""]


def _section_lm(results: EvalResults, notes: _Notes) -> list[str]:
    points = pool(results, "lm")
    if not points:
        return []
    rows = []
    for p in points:
        if p.status == "ok":
            loss = p.loss
            rows.append([p.model, str(p.params["tokenizer"]), str(p.params["seq_len"]),
                         str(sum(c.metrics["tokens"] for c in p.ok)), f"{loss:.4f}",
                         f"{math.exp(min(loss, 700.0)):.3f}", f"{loss / math.log(2):.4f}"])
        else:
            rows.append([p.model, str(p.params["tokenizer"]), str(p.params["seq_len"]),
                         notes.mark(p, _acc), "", "", ""])
    return ["## Language modelling (val split)", "", "Mean next-token cross-entropy (nats), perplexity, bits per "
            "token (bits per byte with the byte tokenizer).", "",
            *_table(["model", "tokenizer", "seq_len", "tokens", "loss", "perplexity", "bits/token"], rows), ""]


def markdown_report(results: EvalResults) -> str:
    """One section per task present: MQAR, S-NIAH (+ depth x length per model), BABILong, capacity, LM.

    Refused and failed cells show as ``refused [n]`` / ``error [n]`` with the reason in a numbered note.
    """
    if not results.cells:
        return "# mnemos evaluation\n\n(no results)\n"
    notes = _Notes()
    body: list[str] = []
    for section in (_section_mqar, _section_niah, _section_babilong, _section_capacity, _section_lm):
        body += section(results, notes)
    seeds = sorted({c.seed for c in results.cells})
    commits = sorted({str(c.versions.get("git_commit"))[:12] + ("+dirty" if c.versions.get("git_dirty") else "")
                      for c in results.cells})
    v = results.cells[0].versions
    head = ["# mnemos evaluation", "",
            f"Seeds: {', '.join(map(str, seeds))} (cells of several seeds or runs are pooled). "
            f"mnemos {v.get('mnemos')}, torch {v.get('torch')}, python {v.get('python')}; "
            f"commit(s) {', '.join(commits)}.",
            ""]
    tail = ["## Notes", "", *notes.lines(), ""] if notes.messages else []
    return "\n".join(head + body + tail)
