"""Shared context, many queries (SCBench, Li et al. 2024, "A KV Cache-Centric Analysis of Long-Context Methods"):
what the tasks whose queries can be split share (MQAR, :mod:`mnemos.eval.tasks.mqar`; NIAH multi-query,
:mod:`mnemos.eval.tasks.niah`).

Two modes (``--turns shared,fresh``, :data:`~mnemos.eval.runner.TURN_MODES`), one cell each, ``params["mode"]``:

- ``shared``: the context up to the first query is prefilled once (``stream_chunk`` tokens per call), then the
  queries are asked in turn with the state carried; a KV policy compresses at the end of every call, so later
  turns read what the cache kept (a query-aware policy chose with the first query only), and a recurrent / neural
  memory's state is "compressed once" by construction.
- ``fresh``: each query gets its own prefill, from a fresh state, of the same prompt the shared mode has fed up to it.

With a state that loses nothing the two agree. Every turn cell records ``turn_correct`` / ``turn_n`` (lists over the
turns; turn k = the k-th query), ``calls`` (forward calls), the largest per-sequence state, and tokens per second:
:class:`TurnLog` counts them. The report's accuracy-by-turn table (:func:`turns_table`) and figure
(:func:`plot_turns`) read them.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Hashable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from torch import Tensor

from mnemos.eval.plots import figure, grid, panel_axes, policy_family, save
from mnemos.eval.results import Cell
from mnemos.eval.runner import TURN_MODES, Run, check_finite, greedy_continue, max_sizes, per_sequence_state, stream
from mnemos.eval.tables import Notes, Pooled, acc, table

__all__ = ["TURNS_HELP", "TurnLog", "plot_turns", "turn_accuracy", "turns_arg", "turns_table"]

TURNS_HELP = ("also run the shared-context, many-queries mode (SCBench): 'shared' prefills the context once and asks "
              "the queries in turn reusing the (compressed) state, 'fresh' prefills the same prompt anew before each "
              "query; accuracy by turn (one sequence per call)")


def turns_arg(text: str) -> tuple[str, ...]:
    """``--turns shared,fresh`` -> ("shared", "fresh")."""
    modes = tuple(x.strip() for x in text.split(",") if x.strip())
    if not modes or any(x not in TURN_MODES for x in modes) or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct modes among shared, fresh (comma-separated), got "
                                         f"{text!r}")
    return modes


class TurnLog:
    """One turn cell's bookkeeping, one sequence at a time (batch 1): feeds through the model (counting tokens and
    calls, checking the logits), hits per turn, the largest state, the per-sequence records, and the metrics."""

    def __init__(self, run: Run, n_turns: int):
        self.run, self.n_turns = run, n_turns
        self.turn_correct, self.turn_n = [0] * n_turns, [0] * n_turns
        self.fed = self.calls = 0
        self.sizes: dict[str, int] = {}
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def prefill(self, ids: Tensor) -> tuple[Tensor, Any]:
        """``ids [1, T]`` from a fresh state, ``stream_chunk`` tokens per call -> (last logits ``[1, V]``, state)."""
        T = ids.shape[1]
        last, state = stream(self.run, ids, self.run.model.init_state(1))
        self.fed += T
        self.calls += -(-T // (self.run.options.stream_chunk or T))
        return last, state

    def call(self, ids: Tensor, state: Any, start: int) -> tuple[Tensor, Any]:
        """One forward call of ``ids [1, t]`` (positions ``start ..``) with ``state`` -> (logits ``[1, t, V]``,
        state)."""
        m = self.run.model
        logits, state = m.forward(ids.to(m.device), state)
        check_finite(m, logits, start)
        self.fed, self.calls = self.fed + ids.shape[1], self.calls + 1
        self.run.bar.update(ids.numel())
        return logits, state

    def decode(self, last: Tensor, state: Any, n_new: int, start: int) -> tuple[Tensor, Any]:
        """``n_new`` greedy tokens after the logits ``last`` (:func:`~mnemos.eval.runner.greedy_continue`) ->
        (``[n_new]`` ids, the state: the last new token not fed)."""
        new, state = greedy_continue(self.run, last, state, n_new, start)
        self.fed, self.calls = self.fed + n_new - 1, self.calls + n_new - 1
        return new[0], state

    def size(self, state: Any) -> None:
        """Keep the largest per-sequence state seen."""
        self.sizes = max_sizes(self.sizes, per_sequence_state(state, 1))

    def score(self, turn: int, hit: bool) -> None:
        self.turn_correct[turn] += int(hit)
        self.turn_n[turn] += 1

    def cell(self, params: dict[str, Any], examples: int, **extra: Any) -> Cell:
        """The cell: accuracy over every turn, the per-turn counts, calls, state size, speed (+ ``extra``);
        the per-sequence records unless ``keep_samples`` is off."""
        seconds = time.perf_counter() - self.t0
        n = sum(self.turn_n)
        cell = self.run.cell(params, metrics={
            "accuracy": sum(self.turn_correct) / max(n, 1), "correct": sum(self.turn_correct), "n": n,
            "examples": examples, "turn_correct": self.turn_correct, "turn_n": self.turn_n, "calls": self.calls,
            **extra, **self.sizes, "tokens_per_second": round(self.fed / max(seconds, 1e-9), 1), "batch_size": 1,
        })
        if self.run.options.keep_samples:
            cell.samples = self.samples
        return cell


def turn_accuracy(p: Pooled) -> list[float] | None:
    """Accuracy at each turn, pooled over the cells that ran (None without turn counts)."""
    cells = [c for c in p.ok if c.metrics.get("turn_n")]
    if not cells:
        return None
    K = max(len(c.metrics["turn_n"]) for c in cells)
    n = [sum(c.metrics["turn_n"][k] for c in cells if k < len(c.metrics["turn_n"])) for k in range(K)]
    return [sum(c.metrics["turn_correct"][k] for c in cells if k < len(c.metrics["turn_n"])) / max(n[k], 1)
            for k in range(K)]


def turns_table(points: Sequence[Pooled], notes: Notes, group: Callable[[Pooled], Hashable],
                caption: Callable[[Any], str], n_turns: Callable[[Any], int]) -> list[str]:
    """Accuracy by turn (bucketed to at most 8 columns) per (model, mode), one table per ``group(point)`` (sorted),
    headed ``caption(group)``, with ``n_turns(group)`` turns."""
    out: list[str] = []
    for g in sorted({group(p) for p in points}):
        mine = [p for p in points if group(p) == g]
        K = n_turns(g)
        n_cols = min(K, 8)
        edges = [round(i * K / n_cols) for i in range(n_cols + 1)]
        heads = [f"{a + 1}" if b - a == 1 else f"{a + 1}-{b}" for a, b in pairwise(edges)]
        rows = []
        for p in mine:
            by_turn = turn_accuracy(p)
            if by_turn is None:
                rows.append([p.model, p.params["mode"], notes.mark(p, acc)] + [""] * n_cols)
                continue
            cols = [f"{sum(by_turn[a:b]) / (b - a):.2f}" for a, b in pairwise(edges)]
            rows.append([p.model, p.params["mode"], acc(p)] + cols)
        out += [caption(g), "", *table(["model", "mode", "all turns"] + [f"turn {h}" for h in heads], rows), ""]
    return out


def plot_turns(points: Sequence[Pooled], path: str | os.PathLike, group: Callable[[Pooled], Hashable],
               title: Callable[[Any], str], suptitle: str, xlabel: str, max_panels: int = 16) -> Path | None:
    """Accuracy by turn of the turn cells ``points`` (with ``params["mode"]``): one panel per model family and
    ``group(point)`` (a base model and its KV policy without the budget, :func:`mnemos.eval.plots.policy_family`: a
    budget sweep shares a panel, a line per budget; a model without a policy has a panel of its own), shared solid,
    fresh dashed; in a policy's panel the base model without a policy, when evaluated, is drawn in black for
    reference. Panels titled ``title(group)`` under the family, at most ``max_panels``. None when no point has turn
    counts."""
    points = [p for p in points if "mode" in p.params and turn_accuracy(p) is not None]
    if not points:
        return None
    panels = list(dict.fromkeys((policy_family(p)[0], group(p)) for p in points))[:max_panels]
    rows, cols = grid(len(panels), max_cols=4)
    fig = figure(3.6 * cols, 3.0 * rows)
    from matplotlib.ticker import MaxNLocator  # after figure(): its ImportError says what to install

    for ax, (fam, g) in zip(panel_axes(fig, rows, cols, len(panels)), panels, strict=True):
        mine = [p for p in points if group(p) == g]
        members = [p for p in mine if policy_family(p)[0] == fam]
        base = members[0].cells[0].model.get("base_model")
        refs = [p for p in mine if base is not None and p.model == base]  # the model without a policy
        budgets = list(dict.fromkeys(policy_family(p)[1] for p in members))
        for p in refs + members:
            by_turn = turn_accuracy(p)
            label = policy_family(p)[1]
            color = "black" if p in refs else f"C{budgets.index(label) % 10}"
            name = "no policy" if p in refs else (label if label is not None else p.model)
            ax.plot(range(1, len(by_turn) + 1), by_turn, color=color, marker="o", ms=2.5, lw=1,
                    ls="-" if p.params["mode"] == "shared" else "--", label=f"{name}, {p.params['mode']}")
        ax.set_ylim(-0.04, 1.04)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # turns are whole numbers
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.set_title(f"{fam}\n{title(g)}", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, loc="lower left")
    fig.suptitle(suptitle, fontsize=9)
    return save(fig, path)
