"""S-NIAH and NIAH multi-query (:class:`~mnemos.data.NIAHConfig`): greedy decoding after the prompt, exact match;
one cell per (length, depth). Figures: the accuracy heat-map (:func:`plot_niah_heatmap`) and a panel per kind,
averaged over depth, in the accuracy-vs-length figure.

Multi-query (``num_queries`` Q >= 2, ``--queries Q``; params gain ``queries``): the plain cell asks each of the Q
questions on its own right after the haystack (Q prompts per sample, :meth:`~mnemos.data.NIAHSample.ask`), its
accuracy over all of them.

Shared context, many queries (SCBench; ``--turns shared,fresh``, :func:`turns_cell`; :mod:`mnemos.eval.turns`): a
dialogue over one haystack. Turn 1's prompt is the sample's prompt (instruction, haystack with the needles, the
first question); the model answers greedily (as many tokens as a plain cell decodes); turn k >= 2 appends the
previous answer's tokens, all of them, as the model generated them, then ``"\\n\\n"`` and question k
(:meth:`~mnemos.data.NIAHSample.follow_up`), and the model answers again: earlier questions and the model's own
answers stay in the context, multi-turn as in SCBench. ``shared`` runs that dialogue on one state (a KV policy's
cache compressed as it goes: at the end of the prefill, of every decoding step and of every question's call);
``fresh`` prefills the dialogue up to question k from a fresh state for every k (its own earlier answers in it).
With a state that loses nothing both give the same answers. One cell per mode (``params["mode"]``) with the
accuracy by turn (turn k = the k-th question; the questions come in a random order, so a turn mixes depths);
table and figure ``niah_turns.png`` (depths pooled)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mnemos.data import NIAHConfig, NIAHSample, exact_match
from mnemos.eval.plots import LengthPanel, figure, grid, panel_axes, save
from mnemos.eval.registry import floats_arg, ints_arg
from mnemos.eval.results import Cell, EvalResults
from mnemos.eval.runner import (
    EvalOptions,
    GenerationTask,
    Run,
    continuation_ids,
    decode_ids,
    generation_cell,
    new_token_count,
    prompt_ids,
    text_vocab_refusal,
)
from mnemos.eval.tables import Notes, Pooled, acc, fmt_length, freeze, lookup, model_names, pool, table
from mnemos.eval.turns import TURNS_HELP, TurnLog, plot_turns, turns_arg, turns_table

__all__ = ["NIAH", "NIAHTask", "plot_niah_heatmap", "plot_niah_turns", "turns_cell"]


class NIAHTask(GenerationTask):
    name = "niah"
    config_type = NIAHConfig
    help = "needle in a haystack (single or multi-query): accuracy by length and depth"

    def tokens(self, config: NIAHConfig, options: EvalOptions) -> int:
        prompts = sum(config.lengths) * len(config.depths) * config.samples_per_cell
        Q = config.num_queries
        return prompts * Q + sum(prompts * (1 if mode == "shared" else Q) for mode in options.niah_turns)

    def grid(self, config: NIAHConfig) -> Iterable[tuple[dict[str, Any], NIAHConfig]]:
        for length in config.lengths:
            for depth in config.depths:
                params = {"kind": config.kind, "length": length, "depth": depth}
                if config.num_queries > 1:
                    params["queries"] = config.num_queries
                yield params, dataclasses.replace(config, lengths=(length,), depths=(depth,))

    def evaluate(self, run: Run) -> list[Cell]:
        """Per grid point: the plain cell (every question on its own after the haystack), then one cell per mode of
        ``EvalOptions.niah_turns``; the samples are built once per point."""
        cells = []
        for params, one in self.grid(run.config):
            built: list[list[NIAHSample]] = []

            def samples(one=one, built=built) -> list[NIAHSample]:
                if not built:
                    built.append(self.samples(one, run.seed))
                return built[0]

            cells.append(run.guarded(params, lambda params=params, samples=samples: generation_cell(
                run, _one_question_each(samples()), params)))
            for mode in run.options.niah_turns:
                mode_params = {**params, "mode": mode}
                cells.append(run.guarded(mode_params, lambda p=mode_params, samples=samples: turns_cell(
                    run, samples(), p)))
        return cells

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
        parser.add_argument("--queries", type=int, default=d["num_queries"], metavar="Q",
                            help="needles and questions per prompt: 1 (default) S-NIAH, Q >= 2 multi-query (Q needles "
                                 "with distinct keys at stratified depths, one question each)")
        parser.add_argument("--turns", type=turns_arg, default=(), metavar="shared,fresh",
                            help=TURNS_HELP + "; the questions of a prompt are its turns, each question and the "
                                              "model's answer staying in the context")

    def from_args(self, args: argparse.Namespace) -> NIAHConfig:
        return NIAHConfig(kind=args.kind, lengths=args.lengths, depths=args.depths, samples_per_cell=args.samples,
                          corpus_paths=tuple(args.corpus), num_queries=args.queries)

    def eval_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"niah_turns": args.turns}

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        all_points = pool(results, self.name)
        points = [p for p in all_points if "mode" not in p.params]  # the turn cells have their own tables
        out = []
        for kind, Q in dict.fromkeys((p.params["kind"], _queries(p)) for p in points):
            pts = [p for p in points if (p.params["kind"], _queries(p)) == (kind, Q)]
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
            if Q == 1:
                head, what = f"## S-NIAH ({kind})", "Exact-match accuracy of the greedy answer"
            else:
                head = f"## NIAH multi-query ({kind}, {Q} needles)"
                what = (f"Exact-match accuracy of the greedy answers, each of the {Q} questions asked on its own "
                        "right after the haystack")
            out += [head, "", f"{what}, mean over depths {', '.join(f'{d:g}' for d in depths)}.", "",
                    *table(["model"] + [fmt_length(L) for L in lengths], rows), ""]
            look = lookup(pts)
            extra = {"queries": Q} if Q > 1 else {}
            for m in model_names(pts):
                detail = []
                for d in depths:
                    detail.append([f"{d:g}"] + [
                        notes.mark(look.get((m, freeze({"kind": kind, "length": L, "depth": d, **extra}))), acc)
                        for L in lengths
                    ])
                out += [f"### {m}: accuracy by depth (rows) and length (columns)", "",
                        *table(["depth"] + [fmt_length(L) for L in lengths], detail), ""]
        turns = _over_depths([p for p in all_points if "mode" in p.params])
        if turns:
            out += ["### NIAH: shared context, many queries (accuracy by turn)", "",
                    "shared: the prompt up to the first question prefilled once, then the questions asked in turn "
                    "on the same state (a KV policy's compressed cache), each question and the model's own answer "
                    "staying in the context; fresh: the same dialogue prefilled anew before each question. Turn k is "
                    "the k-th question (questions in a random order of the needles); depths pooled. With a state "
                    "that loses nothing the two agree.", "",
                    *turns_table(turns, notes, _turn_group,
                                 lambda g: f"{_group_title(g)}, accuracy by turn:",
                                 lambda g: g[1])]
        return out

    def figures(self, results: EvalResults, out_dir: Path) -> list[Path]:
        paths = [plot_niah_heatmap(results, out_dir / "niah_heatmap.png"),
                 plot_niah_turns(results, out_dir / "niah_turns.png")]
        return [p for p in paths if p is not None]

    def length_panels(self, results: EvalResults) -> list[LengthPanel]:
        points = [p for p in pool(results, self.name) if "mode" not in p.params]
        panels = []
        for kind, Q in dict.fromkeys((p.params["kind"], _queries(p)) for p in points):
            # average the depths of a (model, length) into one point
            merged: dict[tuple[str, int], Pooled] = {}
            for p in points:
                if (p.params["kind"], _queries(p)) != (kind, Q):
                    continue
                key = (p.model, p.params["length"])
                merged.setdefault(key, Pooled(p.model, self.name, {"length": p.params["length"]})).cells.extend(p.cells)
            title = f"S-NIAH {kind}" if Q == 1 else f"NIAH {kind}, {Q} queries"
            panels.append(LengthPanel(f"{title} (mean over depths)", list(merged.values())))
        return panels


NIAH = NIAHTask()


def _queries(p: Pooled) -> int:
    return p.params.get("queries", 1)


def _one_question_each(samples: list[NIAHSample]) -> list[NIAHSample]:
    """The prompts of the plain cell: the samples themselves (S-NIAH), or every question of a multi-query sample on
    its own after the haystack."""
    if all(len(s.queries) <= 1 for s in samples):
        return samples
    return [s.ask(k) for s in samples for k in range(len(s.queries))]


def _over_depths(points: list[Pooled]) -> list[Pooled]:
    """Turn points with the depths of a (model, kind, queries, length, mode) pooled into one."""
    merged: dict[tuple, Pooled] = {}
    for p in points:
        params = {k: v for k, v in p.params.items() if k != "depth"}
        params.setdefault("queries", 1)
        merged.setdefault((p.model, freeze(params)), Pooled(p.model, p.task, params)).cells.extend(p.cells)
    return list(merged.values())


def _turn_group(p: Pooled) -> tuple[str, int, int]:
    return p.params["kind"], p.params["queries"], p.params["length"]


def _group_title(g: tuple[str, int, int]) -> str:
    return f"{g[0]}, {g[1]} needle{'s' if g[1] > 1 else ''}, length {fmt_length(g[2])}"


def turns_cell(run: Run, samples: list[NIAHSample], params: dict[str, Any]) -> Cell:
    """The shared-context (``params["mode"] == "shared"``) or fresh-prefill (``"fresh"``) cell of one grid point:
    every sample is a dialogue of its Q questions (module docstring), one sample per call.

    - shared: the prompt (JRT-Prompt: its context twice, then the first question) is prefilled once, ``stream_chunk``
      tokens per call; each answer is ``n`` greedy tokens (``" " + answer`` plus 2, as a plain cell decodes), each
      but the last fed back one call at a time; question k >= 2 is one call of the previous answer's last token,
      ``"\\n\\n"`` and the question, with the state carried.
    - fresh: for each k the dialogue up to question k (the prompt, then the earlier answers this mode gave and the
      questions) is prefilled from a fresh state, ``stream_chunk`` tokens per call, then answered the same way.

    Metrics: as :class:`mnemos.eval.turns.TurnLog` (accuracy, ``turn_correct`` / ``turn_n``, calls, the largest
    state after a turn, speed) and ``tokens``, the longest dialogue fed. Per sample (unless ``--no-samples``): the
    answers, the predictions and the generated token ids turn by turn, and each question's needle depth."""
    m, mode = run.model, params["mode"]
    nominal = sum(s.length for s in samples)
    refused = text_vocab_refusal(run, params, nominal)
    if refused is not None:
        return refused
    Q = len(samples[0].queries)
    firsts = [prompt_ids(m, s, run.jrt) for s in samples]  # turn 1's prompt
    follows = [[continuation_ids(m, s.follow_up(k)) for k in range(1, Q)] for s in samples]  # blank line + question k
    n_new = new_token_count(m, (q.answer for s in samples for q in s.queries))
    dialogue = max(f.numel() + sum(n_new + x.numel() for x in fs) for f, fs in zip(firsts, follows, strict=True))
    longest = dialogue + n_new - 1  # the last answer's last token is never fed
    _, reason = run.admit(longest, 1, f"{Q} questions and answers of {n_new} tokens")
    if reason:
        run.bar.update(nominal)
        return run.cell(params, status="refused", message=reason)

    log = TurnLog(run, Q)
    with torch.no_grad():
        for s, first, follow in zip(samples, firsts, follows, strict=True):
            answers: list[torch.Tensor] = []  # each turn's n_new generated ids
            if mode == "shared":
                last, state = log.prefill(first[None])
                pos = first.numel()
                for k in range(Q):
                    if k:  # the previous answer's last token (not fed yet), the blank line, question k
                        x = torch.cat([answers[-1][-1:], follow[k - 1]])[None]
                        logits, state = log.call(x, state, pos)
                        last, pos = logits[:, -1], pos + x.shape[1]
                    new, state = log.decode(last, state, n_new, pos)
                    answers.append(new)
                    pos += n_new - 1
                    log.size(state)
            else:
                ids = first
                for k in range(Q):
                    if k:
                        ids = torch.cat([ids, answers[-1], follow[k - 1]])
                    last, state = log.prefill(ids[None])
                    new, state = log.decode(last, state, n_new, ids.numel())
                    answers.append(new)
                    log.size(state)
            predictions = [decode_ids(m, a.tolist()) for a in answers]
            for k, (q, pred) in enumerate(zip(s.queries, predictions, strict=True)):
                log.score(k, exact_match(pred, q.answer))
            log.samples.append({"answers": [q.answer for q in s.queries], "predictions": predictions,
                                "correct": [exact_match(p, q.answer)
                                            for p, q in zip(predictions, s.queries, strict=True)],
                                "generated_ids": [a.tolist() for a in answers],
                                "needle_depths": [round(q.needle_depth, 4) for q in s.queries]})
    return log.cell(params, len(samples), tokens=longest)


def plot_niah_turns(results: EvalResults, path: str | os.PathLike, max_panels: int = 16) -> Path | None:
    """NIAH accuracy by turn (the k-th question of a dialogue over one haystack, depths pooled): one panel per model
    family and (kind, queries, length), shared solid, fresh dashed (:func:`mnemos.eval.turns.plot_turns`). None
    when the results hold no NIAH turn cell of two questions or more (one question is one turn: its table says
    it all)."""
    points = [p for p in _over_depths([p for p in pool(results, "niah") if "mode" in p.params])
              if p.params["queries"] > 1]
    return plot_turns(points, path, _turn_group, _group_title,
                      "NIAH, shared context (solid) vs a fresh prefill per question (dashed)", "turn (k-th question)",
                      max_panels)


def plot_niah_heatmap(results: EvalResults, path: str | os.PathLike) -> Path | None:
    """Accuracy heat-map (depth rows x length columns) per (model, kind, queries); refused cells grey. None if no
    NIAH (the turn cells are drawn by :func:`plot_niah_turns`)."""
    points = [p for p in pool(results, "niah") if "mode" not in p.params]
    if not points:
        return None
    panels = list(dict.fromkeys((p.model, p.params["kind"], _queries(p)) for p in points))
    rows, cols = grid(len(panels))
    lengths = sorted({p.params["length"] for p in points})
    depths = sorted({p.params["depth"] for p in points})
    fig = figure(1.2 + 0.75 * len(lengths) * cols + 1.0, 0.9 + 0.42 * len(depths) * rows + 0.6)
    axes = panel_axes(fig, rows, cols, len(panels))
    look = {(p.model, p.params["kind"], _queries(p), p.params["length"], p.params["depth"]): p for p in points}
    import numpy as np

    image = None
    for ax, (model, kind, Q) in zip(axes, panels, strict=True):
        heat = np.full((len(depths), len(lengths)), np.nan)
        labels = [[""] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                p = look.get((model, kind, Q, L, d))
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
        ax.set_title(f"{model} · {kind}" + (f" · {Q} queries" if Q > 1 else ""), fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle("S-NIAH: exact-match accuracy", fontsize=10)
    return save(fig, path)
