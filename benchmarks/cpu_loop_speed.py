"""The memory rule's chunk loop on the CPU, compiled (ops/memory_rule/cpu_scan.cpp) against the PyTorch loop, side by
side in one process: the op alone (``neural_memory_chunked``), forward (no grad: streaming, evaluation) and forward +
backward (training), at a few shapes.

Method: for each shape every variant runs once to warm up, then ``--repeats`` rounds alternate the two loops; the
best round's time is reported with the ratio. Inputs as the Titans layer makes them (unit-norm queries and keys),
memory depth 2, expansion 4, head dim 16 (``--head-dim``), 4 heads (``--heads``), ``normalize_step`` on (the models'
default), float32, one thread unless ``--threads``. ``--no-speed-rule`` runs the compiled loop even where
``cpu_scan.unsupported_reason`` would send a large state to the torch loop (to measure where that rule should sit).
The kernel's vector width is the build's (``MNEMOS_VECTOR_BYTES`` overrides it; the header line prints it).
``--against kept-starts`` compares the compiled loop with itself instead: its training forward keeping the states at
the backward's segment starts (``cpu_scan.SAVED_BOUNDS_BYTES``) against the backward finding them in a pass of its own
(the budget set to 0); only fwd+bwd differs. ``--against-source FILE`` compares it with the library built from
another version of ``cpu_scan.cpp`` (the same calling convention; e.g. ``git show HEAD~1:src/.../cpu_scan.cpp``), both
loaded in this process: the A/B for a change to the kernel. ``--depth`` sets the memory's depth (1 = matrix memory).

Usage:
    python benchmarks/cpu_loop_speed.py
    python benchmarks/cpu_loop_speed.py --shapes 32x68x4 1x4096x4 --repeats 7
    MNEMOS_VECTOR_BYTES=64 python benchmarks/cpu_loop_speed.py --head-dim 64 --shapes 2x2048x16 --no-speed-rule
    python benchmarks/cpu_loop_speed.py --against kept-starts --shapes 16x256x4 --head-dim 32 --depth 3
    git show HEAD~1:src/mnemos/ops/memory_rule/cpu_scan.cpp > /tmp/old_scan.cpp
    python benchmarks/cpu_loop_speed.py --against-source /tmp/old_scan.cpp --shapes 16x256x1 16x256x4 --head-dim 32
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from mnemos.ops import neural_memory_chunked
from mnemos.ops.memory_rule import cpu_scan

DEFAULT_SHAPES = ("32x68x4", "32x68x16", "1x4096x4", "1x4096x16", "8x1024x4")  # batch x tokens x chunk


def inputs(B: int, T: int, H: int = 4, D: int = 16, expansion: int = 4, seed: int = 0, depth: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)  # noqa: E731
    widths = [D] + [expansion * D] * (depth - 1) + [D]
    return dict(q=unit(), k=unit(), v=torch.randn(B, T, H, D, generator=g),
                theta=0.2 * torch.rand(B, T, H, generator=g), eta=0.9 * torch.rand(B, T, H, generator=g),
                alpha=0.1 * torch.rand(B, T, H, generator=g),
                weights=tuple(torch.randn(H, widths[i + 1], widths[i], generator=g) / widths[i] ** 0.5
                              for i in range(depth)))


def run(x: dict, chunk: int, backward: bool) -> float:
    leaves = {n: (tuple(t.clone().requires_grad_(backward) for t in v) if isinstance(v, tuple)
                  else v.clone().requires_grad_(backward)) for n, v in x.items()}
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        o, _ = neural_memory_chunked(leaves["q"], leaves["k"], leaves["v"], leaves["theta"], leaves["eta"],
                                     leaves["alpha"], leaves["weights"], chunk_size=chunk, normalize_step=True)
        if backward:
            o.square().sum().backward()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxTxC: batch, tokens, chunk size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--against", choices=("torch", "kept-starts"), default="torch",
                   help="the other side: the PyTorch loop, or the compiled loop finding its segment starts itself")
    p.add_argument("--against-source", type=Path, metavar="FILE",
                   help="the other side: the compiled loop built from this cpu_scan.cpp (overrides --against)")
    p.add_argument("--no-speed-rule", action="store_true",
                   help="run the compiled loop at every shape (lift cpu_scan.GROUP_STATE_LIMIT)")
    args = p.parse_args(argv)
    if args.no_speed_rule:
        cpu_scan.GROUP_STATE_LIMIT = float("inf")
    torch.set_num_threads(args.threads)
    if cpu_scan.unavailable_reason() is not None:
        p.error(f"the compiled loop is unavailable: {cpu_scan.unavailable_reason()}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.heads} heads of {args.head_dim}, memory depth "
          f"{args.depth}, kernel groups of {cpu_scan.lanes(torch.float32)} rows (float32); best of {args.repeats} "
          "interleaved rounds\n")
    other = "torch loop" if args.against == "torch" else "starts found"
    first = "compiled" if args.against == "torch" else "starts kept"
    libraries = {}
    if args.against_source is not None:
        if not args.against_source.is_file():
            p.error(f"--against-source: no file {args.against_source}")
        first, other = "this source", args.against_source.name
        libraries[True] = cpu_scan.library()
        source = cpu_scan.SOURCE
        cpu_scan.SOURCE, cpu_scan._tried, cpu_scan._library = args.against_source, False, None
        libraries[False] = cpu_scan.library()
        cpu_scan.SOURCE = source
        if libraries[False] is None:
            p.error(f"--against-source: {cpu_scan.unavailable_reason()}")

    @contextlib.contextmanager
    def side(mine: bool):
        if libraries:
            cpu_scan._library = libraries[mine]
            try:
                yield
            finally:
                cpu_scan._library = libraries[True]
            return
        if args.against == "torch":
            with cpu_scan.cpu_kernel(mine):
                yield
            return
        budget = cpu_scan.SAVED_BOUNDS_BYTES
        cpu_scan.SAVED_BOUNDS_BYTES = budget if mine else 0
        try:
            yield
        finally:
            cpu_scan.SAVED_BOUNDS_BYTES = budget

    print(f"| batch x tokens, chunk | pass | {first} ms | {other} ms | {other} / {first} |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        B, T, C = (int(v) for v in shape.split("x"))
        x = inputs(B, T, H=args.heads, D=args.head_dim, depth=args.depth)
        for backward in (False, True):
            best = {True: float("inf"), False: float("inf")}
            for mine in (True, False):  # warm-up
                with side(mine):
                    run(x, C, backward)
            for _ in range(args.repeats):
                for mine in (True, False):
                    with side(mine):
                        best[mine] = min(best[mine], run(x, C, backward))
            print(f"| {B} x {T}, C {C} | {'fwd+bwd' if backward else 'fwd'} | {1e3 * best[True]:.1f} | "
                  f"{1e3 * best[False]:.1f} | {best[False] / best[True]:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
