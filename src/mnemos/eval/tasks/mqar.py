"""MQAR (:class:`~mnemos.data.MQARConfig`): teacher-forced accuracy at the labelled (query) positions, split by how
far back the queried pair lies and by whether the answer is one of the sample's values
(:func:`mnemos.data.mqar_recall_metrics`); one cell per (seq_len, num_kv_pairs) config. Figure: accuracy against the
state size each model carries (:func:`plot_mqar_state_size`).

Shared context, many queries (SCBench; ``--turns shared,fresh``, :func:`turns_cell`): the same sequences, cut at
the queries. ``shared``: the context up to and including the first query is prefilled once (streamed by
``stream_chunk``); each later query is asked in turn, one call holding the tokens since the previous query and the
query itself, the state (a KV policy's compressed cache) carried. ``fresh``: each query gets its own prefill of
everything up to it, from a fresh state. One cell per mode, ``params["mode"]``, with the accuracy by turn
(``turn_correct`` / ``turn_n``, turn k = the k-th query in the sequence); figure :func:`plot_mqar_turns`. The
bookkeeping, the table and the figure are :mod:`mnemos.eval.turns`', shared with NIAH multi-query."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from itertools import pairwise
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mnemos.checkpoint import read_trainer_state
from mnemos.data import (
    IGNORE_INDEX,
    MQAR_EXTRAPOLATION_GRID,
    MQAR_NOISE,
    MQAR_ZOOLOGY_GRID,
    MQARConfig,
    mqar_grid,
    mqar_recall_metrics,
)
from mnemos.eval.plots import figure, figure_legend, grid, log_ticks, panel_axes, save
from mnemos.eval.jrt import JRT_SUFFIX, jrt_mqar, jrt_mqar_predictions
from mnemos.eval.registry import EvalTask
from mnemos.eval.results import Cell, EvalResults
from mnemos.eval.runner import EvalOptions, Run, batches, max_sizes, per_sequence_state, stream
from mnemos.eval.stateful import StatefulLM
from mnemos.eval.tables import Notes, Pooled, acc, model_names, pool, si, table
from mnemos.eval.turns import TURNS_HELP, TurnLog, plot_turns, turns_arg, turns_table
from mnemos.models.registry import HYBRID, VARIANT_REGISTRY, stack_reach

__all__ = ["MQAR", "MQARTask", "MQAR_TASK_KEYS", "model_reach", "pairs_arg", "plot_mqar_state_size",
           "plot_mqar_turns", "reach_arg", "run_reach", "saved_mqar_task", "turns_arg", "turns_cell"]


class MQARTask(EvalTask):
    name = "mqar"
    config_type = MQARConfig
    help = "multi-query associative recall, teacher-forced accuracy"
    jrt = ("the K key-value pairs (the first 2K tokens), twice, then the queries among their noise; answers scored at "
           "the same query tokens, near / far measured to the second copy")

    def vocab_size(self, config: MQARConfig) -> int:
        return config.vocab_size

    def tokens(self, config: MQARConfig, options: EvalOptions) -> int:
        return config.num_examples * config.seq_len

    def evaluate(self, run: Run) -> list[Cell]:
        cfg: MQARConfig = run.config
        params = {"seq_len": cfg.seq_len, "num_kv_pairs": cfg.num_kv_pairs, "vocab_size": cfg.vocab_size}
        cells = [run.guarded(params, lambda: _mqar_cell(run, cfg, params))]
        for mode in run.options.mqar_turns:
            mode_params = {**params, "mode": mode}
            cells.append(run.guarded(mode_params, lambda m=mode_params: turns_cell(run, cfg, m)))
        return cells

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = {f.name: f.default for f in fields(MQARConfig)}
        ckpt = "the checkpoints' training task, else"  # what a flag left out defaults to
        parser.add_argument("--grid", choices=("zoology", "extrapolation"), default=None,
                            help=f"(seq_len, num_kv_pairs) grid (default: {ckpt} zoology)")
        parser.add_argument("--pairs", type=pairs_arg, default=None, metavar="L:K,...",
                            help="explicit grid, e.g. 64:4,256:16")
        parser.add_argument("--vocab-size", type=int, default=None, help=f"(default: {ckpt} {d['vocab_size']})")
        parser.add_argument("--num-examples", type=int, default=d["num_examples"],
                            help="per grid point (default %(default)s)")
        parser.add_argument("--power-a", type=float, default=None,
                            help=f"query position power law (default: {ckpt} {d['power_a']})")
        parser.add_argument("--noise", choices=MQAR_NOISE, default=None,
                            help=f"noise tokens: as Zoology (may repeat keys), disjoint from the sample's keys, or "
                                 f"value ids only (no key-value bigram in the noise; a diagnostic) (default: {ckpt} "
                                 f"{d['noise']})")
        parser.add_argument("--reach", type=reach_arg, default="auto", metavar="N|auto|none",
                            help="split accuracy at queries whose key is <= N tokens back (near) or further (far); "
                                 "auto (default): the reach n_layers * (window - 1) of the sliding-window models "
                                 "(swa, mag, mal) evaluated, for every model; none: no split")

        parser.add_argument("--turns", type=turns_arg, default=(), metavar="shared,fresh", help=TURNS_HELP)

    def from_args(self, args: argparse.Namespace) -> list[MQARConfig]:
        # what the flags leave open comes from the checkpoints' training task, else MQARConfig's defaults
        open_keys = [k for k in ("vocab_size", "power_a", "noise") if getattr(args, k) is None]
        grid_open = not args.pairs and args.grid is None
        saved = saved_mqar_task(args.model, open_keys + (["seq_len", "num_kv_pairs"] if grid_open else []))
        taken = {k: saved[k] for k in open_keys if k in saved}
        pairs = args.pairs
        if grid_open and {"seq_len", "num_kv_pairs"} <= saved.keys():
            pairs = ((saved["seq_len"], saved["num_kv_pairs"]),)
            taken.update(seq_len=saved["seq_len"], num_kv_pairs=saved["num_kv_pairs"])
        grids = {"zoology": MQAR_ZOOLOGY_GRID, "extrapolation": MQAR_EXTRAPOLATION_GRID}
        pairs = pairs or grids[args.grid or "zoology"]
        if taken:
            print("MQAR task from the checkpoint: " + ", ".join(f"{k} {v}" for k, v in taken.items()), file=sys.stderr)
        default = {f.name: f.default for f in fields(MQARConfig)}
        kw = {k: taken.get(k, default[k]) if getattr(args, k) is None else getattr(args, k)
              for k in ("vocab_size", "power_a", "noise")}
        return mqar_grid(pairs, num_examples=args.num_examples, **kw)

    def eval_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"mqar_reach": args.reach, "mqar_turns": args.turns}

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        all_points = pool(results, self.name)
        points = [p for p in all_points if "mode" not in p.params]  # the shared-context cells have their own table
        turn_lines = _turns_section([p for p in all_points if "mode" in p.params], notes)
        if not points:
            return ["## MQAR", "", *turn_lines] if turn_lines else []
        grid = sorted(dict.fromkeys((p.params["seq_len"], p.params["num_kv_pairs"], p.params["vocab_size"])
                                    for p in points))
        by = {(p.model, p.params["seq_len"], p.params["num_kv_pairs"], p.params["vocab_size"]): p for p in points}
        several_v = len({g[2] for g in grid}) > 1
        header = ["model", "state (numbers / seq)"] + [f"L={L} K={K}" + (f" V={V}" if several_v else "")
                                                      for L, K, V in grid]
        rows = []
        for m in model_names(points):
            states = [p.metric_max("state_numel") for p in points if p.model == m and p.metric_max("state_numel")]
            rows.append([m, si(max(states)) if states else "—"]
                        + [notes.mark(by.get((m, *g)), acc) for g in grid])
        return ["## MQAR", "", "Teacher-forced accuracy at the query positions (guessing a value token scores 2 / V).",
                "", *table(header, rows), "", *_detail(points), *turn_lines]

    def figures(self, results: EvalResults, out_dir: Path) -> list[Path]:
        paths = [plot_mqar_state_size(results, out_dir / "mqar_state_size.png"),
                 plot_mqar_turns(results, out_dir / "mqar_turns.png")]
        return [p for p in paths if p is not None]


MQAR = MQARTask()


def _mqar_cell(run: Run, cfg: MQARConfig, params: dict[str, Any]) -> Cell:
    m = run.model
    if m.vocab_size < cfg.vocab_size:
        run.bar.update(cfg.num_examples * cfg.seq_len)
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, the "
                                                          f"task uses {cfg.vocab_size}")
    K = cfg.num_kv_pairs
    fed_len = cfg.seq_len + (2 * K if run.jrt else 0)  # JRT-Prompt: the 2K context tokens once more
    batch, reason = run.admit(fed_len, run.options.batch_size)
    if reason:
        run.bar.update(cfg.num_examples * cfg.seq_len)
        return run.cell(params, status="refused", message=reason)
    inputs, labels = cfg.build(run.seed)  # [N, L] each
    fed = jrt_mqar(inputs, labels, K)[0] if run.jrt else inputs  # [N, L (+ 2K)]: what the model reads
    pred = torch.zeros_like(fed)  # [N, L (+ 2K)]: argmax after each token
    sizes: dict[str, int] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in batches(inputs.shape[0], batch):

            def keep(start: int, logits: Tensor, rows=rows) -> None:
                pred[rows, start : start + logits.shape[1]] = logits.argmax(-1).cpu()

            _, state = stream(run, fed[rows], m.init_state(rows.stop - rows.start), keep)
            sizes = max_sizes(sizes, per_sequence_state(state, rows.stop - rows.start))
    seconds = time.perf_counter() - t0
    if run.jrt:  # score the last L positions against the plain sample: the same queries, distances to the 2nd copy
        pred = jrt_mqar_predictions(pred, K)
    scores = mqar_recall_metrics(pred, inputs, labels, cfg.num_kv_pairs, run_reach(run), vocab_size=cfg.vocab_size)
    scores = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in scores.items()}  # empty buckets
    return run.cell(params, metrics={
        **scores, "examples": cfg.num_examples, **sizes,
        "tokens_per_second": round(fed.numel() / max(seconds, 1e-9), 1), "batch_size": batch,
    })


def turns_cell(run: Run, cfg: MQARConfig, params: dict[str, Any]) -> Cell:
    """The shared-context (``params["mode"] == "shared"``) or fresh-prefill (``"fresh"``) cell: every sequence is
    cut at its K query positions p_1 < ... < p_K (turn k asks the k-th query of the sequence), one sequence per call
    (query positions differ between sequences).

    - shared: ``[0, p_1]`` is prefilled once (``stream_chunk`` tokens per call), the prediction at p_1 answers turn
      1; turn k >= 2 is one call of ``(p_{k-1}, p_k]`` (the noise since the previous query, then the query) with
      the state carried, its last logits answering. A KV policy compresses at the end of each call, so later turns
      read what the cache kept of the context (a query-aware policy saw the first query only).
    - fresh: each query k gets its own prefill of ``[0, p_k]`` from a fresh state (``stream_chunk`` tokens per call).

    With a state that loses nothing both give the one-call teacher-forced predictions (tested). Metrics: accuracy,
    ``turn_correct`` / ``turn_n`` (lists over the K turns), ``calls`` (forward calls), the largest state after a
    prefill / the last turn (per sequence), tokens per second."""
    m, mode = run.model, params["mode"]
    n_tokens = cfg.num_examples * cfg.seq_len
    if m.vocab_size < cfg.vocab_size:
        run.bar.update(n_tokens)
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, the "
                                                          f"task uses {cfg.vocab_size}")
    K = cfg.num_kv_pairs
    _, reason = run.admit(cfg.seq_len + (2 * K if run.jrt else 0), 1)
    if reason:
        run.bar.update(n_tokens)
        return run.cell(params, status="refused", message=reason)
    inputs, labels = cfg.build(run.seed)  # [N, L] each
    if run.jrt:  # JRT-Prompt: the pairs twice, each label still at its query token; the shared prefill reads both
        inputs, labels = jrt_mqar(inputs, labels, K)
    log = TurnLog(run, K)
    with torch.no_grad():
        for n in range(inputs.shape[0]):
            ids, lab = inputs[n : n + 1], labels[n]
            qpos = (lab != IGNORE_INDEX).nonzero().flatten().tolist()  # the K query positions, in order
            if mode == "shared":
                last, state = log.prefill(ids[:, : qpos[0] + 1])
                preds = [int(last.argmax(-1))]
                for prev, q in pairwise(qpos):  # the noise since the previous query, then the query
                    logits, state = log.call(ids[:, prev + 1 : q + 1], state, prev + 1)
                    preds.append(int(logits[0, -1].argmax()))
                log.size(state)
            else:
                preds = []
                for q in qpos:
                    last, state = log.prefill(ids[:, : q + 1])
                    preds.append(int(last.argmax(-1)))
                    log.size(state)
            for k, (q, p) in enumerate(zip(qpos, preds, strict=True)):
                log.score(k, p == int(lab[q]))
            # per sequence: its query positions, answers and the predictions turn by turn
            log.samples.append({"query_positions": qpos, "answers": [int(lab[q]) for q in qpos], "predictions": preds})
    return log.cell(params, inputs.shape[0])


def _turns_section(points: Sequence[Pooled], notes: Notes) -> list[str]:
    """The shared-context table: accuracy by turn (bucketed to at most 8 columns) per (model, mode), per (L, K)."""
    if not points:
        return []
    return ["### MQAR: shared context, many queries (accuracy by turn)", "",
            "shared: the context up to the first query prefilled once, then each query asked in turn reusing the "
            "state (a KV policy's compressed cache); fresh: each query with its own prefill of everything before it. "
            "Turn k is the k-th query of the sequence. With a state that loses nothing the two agree.", "",
            *turns_table(points, notes, _seq_len_pairs, lambda g: f"L={g[0]} K={g[1]}, accuracy by turn:",
                         lambda g: g[1])]


def _seq_len_pairs(p: Pooled) -> tuple[int, int]:
    return p.params["seq_len"], p.params["num_kv_pairs"]


def plot_mqar_turns(results: EvalResults, path: str | os.PathLike, max_panels: int = 16) -> Path | None:
    """MQAR accuracy by turn in the shared-context mode: one panel per model family and (L, K) (a base model and
    its KV policy without the budget, :func:`mnemos.eval.plots.policy_family`: a budget sweep shares a panel, a line
    per budget; a model without a policy has a panel of its own), shared solid, fresh dashed; in a policy's panel the
    base model without a policy, when evaluated, is drawn in black for reference. At most ``max_panels`` panels.
    None when the results hold no shared-context cell."""
    return plot_turns(pool(results, "mqar"), path, _seq_len_pairs, lambda g: f"L={g[0]} K={g[1]}",
                      "MQAR, shared context (solid) vs a fresh prefill per query (dashed)", "turn (k-th query)",
                      max_panels)


def model_reach(model: StatefulLM) -> int | None:
    """How far back a model with sliding-window attention sees through attention alone: ``n_layers * (window - 1)``
    for mnemos' sliding-window variants (swa, mag, mal: their registry entries' ``reach``, read from
    ``model.config``); for a hybrid stack the sum over its sliding-window blocks, None if one of its blocks is full
    attention (``stack_reach``); None for any other model."""
    config = getattr(model, "config", None)
    variant = getattr(config, "variant", None)
    known = isinstance(variant, str) and (variant in VARIANT_REGISTRY or variant == HYBRID)
    if not known or not all(isinstance(getattr(config, k, None), int) for k in ("n_layers", "window")):
        return None
    return stack_reach(config)  # a plain stack: its variant's entry's reach


def run_reach(run: Run) -> int | None:
    """Where ``run.model``'s queries split into near and far (``EvalOptions.mqar_reach``, see there): the option's
    number; or, for ``"auto"``, the one reach of the run's sliding-window models (``run.peers``) when they agree,
    else the model's own."""
    reach = run.options.mqar_reach
    if reach != "auto":
        return reach
    windowed = {r for r in map(model_reach, run.peers) if r is not None}
    return windowed.pop() if len(windowed) == 1 else model_reach(run.model)


def _detail(points: Sequence[Pooled]) -> list[str]:
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
            *table(["model", "L", "K", "reach", "accuracy", "near", "far", "ctx-value", "ctx-value far", "1/K",
                     "chance"], rows), ""]



def plot_mqar_state_size(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """MQAR accuracy vs per-sequence state size (numbers, log scale), a panel per (L, K), a point per model
    (Zoology's figure).

    Models of one family (same ``variant``, or same class) are joined by a line in order of state size. None when
    the results hold fewer than two distinct state sizes (nothing to compare) or no MQAR.
    """
    points = [p for p in pool(results, "mqar") if p.status == "ok" and (p.metric_max("state_numel") or 0) > 0
              and "mode" not in p.params]
    if len({p.metric_max("state_numel") for p in points}) < 2:
        return None
    configs = sorted({(p.params["seq_len"], p.params["num_kv_pairs"]) for p in points})
    rows, cols = grid(len(configs))
    fig = figure(4.2 * cols, 3.3 * rows)
    from matplotlib.ticker import NullFormatter  # after figure(): its ImportError says what to install

    def family(p: Pooled) -> str:
        d = p.cells[0].model
        fam = str(d.get("variant") or d.get("family") or d.get("class") or p.model)
        return fam + (JRT_SUFFIX if d.get("jrt_prompt") else "")  # --jrt: JRT cells are a family of their own

    families = list(dict.fromkeys(family(p) for p in points))
    for ax, (L, K) in zip(panel_axes(fig, rows, cols, len(configs)), configs, strict=True):
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
        # round numbers as 20k / 1.5M, never matplotlib's minor labels (2x10^3, 3x10^3, ... ran into each other)
        lo, hi = ax.get_xlim()
        ticks = log_ticks(lo, hi)
        ax.set_xticks(ticks, [si(t) for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.04, 1.04)
        ax.set_xlabel("state size (numbers per sequence)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(f"MQAR L={L} K={K}", fontsize=9)
        ax.grid(alpha=0.3)
    figure_legend(fig)
    return save(fig, path)


def pairs_arg(text: str) -> tuple[tuple[int, int], ...]:
    """``--pairs 64:4,256:16`` -> ((64, 4), (256, 16))."""
    try:
        return tuple((int(a), int(b)) for a, b in (x.split(":") for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated SEQ_LEN:NUM_KV_PAIRS, got {text!r}") from None


def reach_arg(text: str) -> int | str | None:
    """``--reach``: a number of tokens >= 0, ``auto`` or ``none`` (None)."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 0, 'auto' or 'none', got {text!r}")
    return n


MQAR_TASK_KEYS = ("vocab_size", "seq_len", "num_kv_pairs", "power_a", "noise")


def saved_mqar_task(model_specs: Sequence[str], keys: Sequence[str] = MQAR_TASK_KEYS) -> dict[str, Any]:
    """The MQAR settings (those of ``keys`` that were saved) the checkpoints among ``model_specs`` were trained on,
    from each checkpoint's run config (``config.json``, else ``trainer.pt``) whose ``task.kind`` is mqar. Other
    specs (variants, baselines, LM runs) add nothing; {} when none has any. Checkpoints that disagree on one of
    ``keys`` are an error naming them."""
    found: dict[str, tuple[Any, str]] = {}
    for spec in model_specs:
        path = Path(spec)
        if not (path.is_dir() and (path / "trainer.pt").is_file()):
            continue
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
        config = config or read_trainer_state(path).get("config") or {}
        task = config.get("task") if isinstance(config, dict) else None
        if not isinstance(task, dict) or task.get("kind", "mqar") != "mqar":
            continue
        for key in keys:
            if key not in task:
                continue
            if key in found and found[key][0] != task[key]:
                raise ValueError(f"the checkpoints were trained on different MQAR tasks: task.{key} is "
                                 f"{found[key][0]!r} in {found[key][1]} and {task[key]!r} in {spec}; give the task "
                                 "explicitly (--vocab-size, --pairs L:K, --power-a, --noise)")
            found.setdefault(key, (task[key], spec))
    return {k: v for k, (v, _) in found.items()}
