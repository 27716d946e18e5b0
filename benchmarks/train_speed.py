"""Training tokens/s of MnemosLM variants at the recall studies' sizes, side by side in one process.

Every row is a full training step of ``MnemosLM``: forward, cross-entropy over every position, backward, global
gradient-norm clipping at 1.0 and an AdamW step (what ``mnemos train`` does per step, without the data loader).
Sizes (the MQAR preset's): d_model 64, 2 layers, 4 heads (head dim 16), vocab 128, sliding window 8, MAC segments of
32, 4 persistent tokens, memory depth 2 expansion 4. Memory variants run once per ``--chunk-sizes`` value and per
``--loops`` value: the memory rule's chunk loop compiled for the CPU (``compiled``: ops/memory_rule/cpu_scan.cpp,
what the torch path runs on a CPU by default) and in PyTorch (``torch``: ``MNEMOS_CPU_KERNEL=0``), side by side.

Method: every row is built and warmed up (``--warmup`` steps) first. Then ``--repeats`` rounds, each timing
``--steps`` consecutive steps of every row in turn (rows interleaved, so that a busy machine slows every row alike).
A row's tokens/s is ``batch * seq_len`` divided by the best round's time per step (the median is also reported).
The ratio column divides by the transformer's tokens/s of the same run. For context the script first measures the
machine's ceiling: GFLOP/s of a 512^3 float32 matmul on the same thread count.

Usage:
    python benchmarks/train_speed.py                              # 1 thread, batch 32, T 64, chunks 4 and 16
    python benchmarks/train_speed.py --seq-len 256 --variants lmm transformer --chunk-sizes 4
    python benchmarks/train_speed.py --json benchmarks/results/train_speed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mnemos.models import MnemosConfig, MnemosLM
from mnemos.models.config import TITANS_VARIANTS
from mnemos.ops.memory_rule import cpu_scan

DEFAULT_VARIANTS = ("lmm", "mag", "mac", "mal", "transformer", "swa", "gated_deltanet")


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    """Best-of GFLOP/s of an n^3 float32 matmul (the machine's ceiling at the current thread count)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def build_row(variant: str, chunk: int | None, loop: str | None, args) -> dict:
    memory = dict(chunk_size=chunk or 16, value_norm=args.value_norm,
                  max_chunk_lr=None if args.max_chunk_lr <= 0 else args.max_chunk_lr)
    cfg = MnemosConfig(variant=variant, vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, window=args.window, segment_len=args.segment_len,
                       num_persistent=args.num_persistent, memory=memory)
    torch.manual_seed(args.seed)
    model = MnemosLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
    name = variant if chunk is None else f"{variant} (C {chunk}{', torch loop' if loop == 'torch' else ''})"
    return dict(name=name, variant=variant, chunk_size=chunk, loop=loop, model=model, opt=opt, ids=ids, samples=[])


def train_step(row: dict) -> float:
    model, opt, ids = row["model"], row["opt"], row["ids"]
    with cpu_scan.cpu_kernel(row["loop"] != "torch"):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def time_steps(row: dict, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(row)
    return (time.perf_counter() - t0) / steps


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--chunk-sizes", nargs="+", type=int, default=[4, 16], help="memory chunk sizes (memory variants)")
    p.add_argument("--loops", nargs="+", choices=("compiled", "torch"), default=["compiled", "torch"],
                   help="the memory rule's chunk loop on the CPU (memory variants): compiled, torch or both")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="training steps per row per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--segment-len", type=int, default=32)
    p.add_argument("--num-persistent", type=int, default=4)
    p.add_argument("--value-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-chunk-lr", type=float, default=1.0, help="memory.max_chunk_lr (<= 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write every sample and the settings here")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)

    if "compiled" in args.loops and cpu_scan.unavailable_reason() is not None:
        p.error(f"--loops compiled: {cpu_scan.unavailable_reason()}")
    ceiling = matmul_gflops()
    rows = []
    for v in args.variants:
        for c in (args.chunk_sizes if v in TITANS_VARIANTS else [None]):
            for loop in (args.loops if v in TITANS_VARIANTS else [None]):
                rows.append(build_row(v, c, loop, args))
    for row in rows:
        for _ in range(args.warmup):
            row["loss"] = train_step(row)
    for _ in range(args.repeats):
        for row in rows:
            row["samples"].append(time_steps(row, args.steps))

    tokens = args.batch * args.seq_len
    for row in rows:
        row["tok_s"] = tokens / min(row["samples"])
        row["tok_s_median"] = tokens / statistics.median(row["samples"])
    ref = next((r["tok_s"] for r in rows if r["variant"] == "transformer"), None)

    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}; "
          f"ceiling: {ceiling:.1f} GFLOP/s (512^3 float32 matmul)")
    print(f"MnemosLM d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab}, "
          f"window {args.window}; batch {args.batch}, T {args.seq_len}; memory value_norm={args.value_norm}, "
          f"max_chunk_lr={args.max_chunk_lr}; best of {args.repeats} rounds of {args.steps} steps\n")
    print("| variant | ms / step | tokens/s (best) | tokens/s (median) | ratio to transformer |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['tok_s'] / ref:.2f}" if ref else "-"
        print(f"| {row['name']} | {1e3 * min(row['samples']):.1f} | {row['tok_s']:,.0f} | {row['tok_s_median']:,.0f} "
              f"| {ratio} |")
    if args.json:
        out = dict(
            settings=vars(args), torch=torch.__version__, python=sys.version.split()[0], commit=git_commit(),
            processor=platform.processor() or platform.machine(), ceiling_gflops=ceiling,
            rows=[{k: r[k] for k in ("name", "variant", "chunk_size", "loop", "samples", "tok_s", "tok_s_median", "loss")}
                  for r in rows],
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
