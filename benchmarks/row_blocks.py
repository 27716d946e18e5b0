"""The memory rule's op at the training shape run on all rows at once against the same rows in 2 or 4 blocks.

Why: at B 32 each layer's ``[W; S]`` state is 1 MiB, twice a core's L2 on the development machine; blocks of 16 rows
fit it but double the per-chunk dispatch. Rows are independent, so every split gives the same outputs and gradients.
One thread, rows interleaved per round, best and median of the rounds (docs/PERFORMANCE.md, "Rows in two halves").

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/row_blocks.py --chunk 4
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/row_blocks.py --chunk 16 --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mnemos.ops import neural_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=68, help="tokens per call (64 + 4 persistent in the study)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, T, H, D, E = args.batch, args.seq_len, 4, 16, 64
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    gates = [(torch.rand(B, T, H) * s).requires_grad_() for s in (0.1, 0.9, 0.01)]  # theta, eta, alpha
    W = [(torch.randn(H, E, D) * 0.2).requires_grad_(), (torch.randn(H, D, E) * 0.2).requires_grad_()]

    def run(blocks: int) -> None:
        n = B // blocks
        for i in range(blocks):
            s = slice(i * n, (i + 1) * n)
            o, _ = neural_memory(q[s], k[s], v[s], *(g[s] for g in gates), W, chunk_size=args.chunk,
                                 normalize_step=True)
            o.square().sum().backward()

    times: dict[int, list[float]] = {b: [] for b in args.blocks}
    for b in args.blocks:
        run(b)  # warm-up
    for _ in range(args.rounds):
        for b in args.blocks:
            t0 = time.perf_counter()
            run(b)
            times[b].append(time.perf_counter() - t0)
    print(f"neural_memory fwd+bwd, B {B}, T {T}, H {H}, depth 2 (16 -> 64 -> 16), chunk {args.chunk}, 1 thread, "
          f"{args.rounds} rounds")
    print("| blocks | rows per call | best ms | median ms |\n|---|---|---|---|")
    for b, ts in times.items():
        print(f"| {b} | {B // b} | {min(ts) * 1e3:.1f} | {statistics.median(ts) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
