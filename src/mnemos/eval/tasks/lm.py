"""Language modelling (:class:`~mnemos.data.LMDataConfig`): next-token loss and perplexity over windows of the val
split; one cell."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mnemos.data import LMDataConfig
from mnemos.eval.registry import EvalTask
from mnemos.eval.results import Cell, EvalResults
from mnemos.eval.runner import EvalOptions, Run, batches, max_sizes, per_sequence_state, stream
from mnemos.eval.tables import Notes, acc, pool, table

__all__ = ["LM", "LMTask"]


class LMTask(EvalTask):
    name = "lm"
    config_type = LMDataConfig
    help = "next-token loss and perplexity on the val split"

    def vocab_size(self, config: LMDataConfig) -> int:
        return config.bpe_vocab_size if config.tokenizer == "bpe" else super().vocab_size(config)

    def tokens(self, config: LMDataConfig, options: EvalOptions) -> int:
        return config.seq_len * (options.lm_max_windows or 0)

    def evaluate(self, run: Run) -> list[Cell]:
        cfg: LMDataConfig = run.config
        params = {"seq_len": cfg.seq_len, "tokenizer": cfg.tokenizer}
        return [run.guarded(params, lambda: _lm_cell(run, cfg, params))]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = {f.name: f.default for f in fields(LMDataConfig)}
        parser.add_argument("--seq-len", type=int, default=d["seq_len"],
                            help="tokens per window (default %(default)s)")
        parser.add_argument("--text", action="append", default=[], metavar="PATH",
                            help="text files/dirs (default: built-in)")
        parser.add_argument("--tokenizer", choices=("byte", "bpe"), default=d["tokenizer"],
                            help="(default %(default)s)")
        parser.add_argument("--bpe-vocab-size", type=int, default=d["bpe_vocab_size"], help="(default %(default)s)")
        parser.add_argument("--val-fraction", type=float, default=d["val_fraction"], help="(default %(default)s)")
        parser.add_argument("--max-windows", type=int, default=64, help="windows scored, 0 = all (default %(default)s)")

    def from_args(self, args: argparse.Namespace) -> LMDataConfig:
        return LMDataConfig(seq_len=args.seq_len, batch_size=args.batch_size, paths=tuple(args.text),
                            tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size,
                            val_fraction=args.val_fraction)

    def eval_options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"lm_max_windows": args.max_windows or None}

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        points = pool(results, self.name)
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
                             notes.mark(p, acc), "", "", ""])
        return ["## Language modelling (val split)", "", "Mean next-token cross-entropy (nats), perplexity, bits per "
                "token (bits per byte with the byte tokenizer).", "",
                *table(["model", "tokenizer", "seq_len", "tokens", "loss", "perplexity", "bits/token"], rows), ""]


LM = LMTask()


def _lm_cell(run: Run, cfg: LMDataConfig, params: dict[str, Any]) -> Cell:
    m = run.model
    data = cfg.build(run.seed)
    tokens = data.val
    if m.tokenizer is not None:  # score the same text in the model's own tokens
        tokens = torch.tensor(m.tokenizer.encode(data.tokenizer.decode(tokens.tolist())), dtype=torch.int64)
    elif m.vocab_size < data.tokenizer.vocab_size:
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, the "
                                                          f"{cfg.tokenizer} tokenizer {data.tokenizer.vocab_size}")
    T = cfg.seq_len
    n_windows = (tokens.numel() - 1) // T
    if run.options.lm_max_windows is not None:
        n_windows = min(n_windows, run.options.lm_max_windows)
    if n_windows < 1:
        return run.cell(params, status="refused",
                        message=f"refused: the val split has {tokens.numel()} tokens, fewer than seq_len + 1 = {T + 1}")
    batch, reason = run.admit(T, run.options.batch_size)
    if reason:
        return run.cell(params, status="refused", message=reason)
    starts = torch.arange(n_windows) * T  # non-overlapping windows, in order
    windows = tokens[starts[:, None] + torch.arange(T + 1)]  # [W, T + 1]
    loss_sum = torch.zeros((), dtype=torch.float64)
    sizes: dict[str, int] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in batches(n_windows, batch):
            x, y = windows[rows, :-1], windows[rows, 1:]  # [b, T] each

            def score(start: int, logits: Tensor, y=y) -> None:
                nonlocal loss_sum
                target = y[:, start : start + logits.shape[1]].to(logits.device)  # [b, c]
                logits = logits if logits.dtype == torch.float64 else logits.float()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
                loss_sum = loss_sum + ce.double().cpu()

            _, state = stream(run, x, m.init_state(x.shape[0]), score)
            sizes = max_sizes(sizes, per_sequence_state(state, x.shape[0]))
    seconds = time.perf_counter() - t0
    count = n_windows * T
    loss = float(loss_sum) / count
    return run.cell(params, metrics={
        "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
        "tokens": count, "windows": n_windows, **sizes,
        "tokens_per_second": round(count / max(seconds, 1e-9), 1), "batch_size": batch,
    })
