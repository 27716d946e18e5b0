"""How far the Triton kernels' TF32 dot precisions move the memory rule's results: each precision against the chunked
torch path in float64 on the same device, at the GPU shape, outputs, final state and every input gradient.

The kernels' ``tl.dot`` runs with exact float32 products by default (``ieee``); ``tf32x3`` (three TF32 tensor-core
products, about float32 accuracy) and ``tf32`` (one; ~1e-3 relative per product) are faster on a GPU
(docs/PERFORMANCE.md, "GPU"). This measures what they cost in accuracy, beside the tolerances the tests hold the
kernels to (float32 2e-5 / 1e-4, bf16 5e-3 / 1e-2 relative RMSE for outputs and states / gradients), to decide the
default (``MNEMOS_TRITON_DOT_PRECISION`` picks one per process; here each precision is set in turn, in one process).

    PYTHONPATH=src python benchmarks/triton_precision.py                      # CUDA, the GPU shape
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/triton_precision.py --device cpu --batch 1 --seq-len 40 \\
        --heads 2 --head-dim 16 --expansion 2                                # the script itself, on a CPU

Under the interpreter the precision is ignored (every row is float64-exact): that run checks the script only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import mnemos  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnemos.ops import neural_memory
from mnemos.testing import rel_rmse

TOLERANCES = {"float32": (2e-5, 1e-4), "bfloat16": (5e-3, 1e-2)}  # tests/ops/test_triton.py: (outputs, gradients)


def make_inputs(B, T, H, D, depth, expansion, dtype, device, seed=0):
    """The op_speed inputs: unit q, k, randn v in ``dtype``; float32 gates and weights (as the layer makes them)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = (F.normalize(randn(B, T, H, D), dim=-1) for _ in range(2))
    v = randn(B, T, H, D)
    theta = 0.01 * torch.sigmoid(randn(B, T, H))
    eta = torch.sigmoid(randn(B, T, H))
    alpha = torch.sigmoid(randn(B, T, H) - 4)
    widths = [D] + [expansion * D] * (depth - 1) + [D]
    weights = [0.02 * randn(H, widths[i + 1], widths[i]) for i in range(depth)]
    toks = [x.to(device, dtype) for x in (q, k, v)]
    rest = [x.to(device) for x in (theta, eta, alpha, *weights)]
    return toks + rest


def run(inputs, impl, chunk_size, residual, cot):
    """o, the final weights and momentum, and the gradients of <o, cot> + |state|^2 with respect to every input."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    q, k, v, theta, eta, alpha, *weights = leaves
    o, s = neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, residual=residual, impl=impl,
                         output_final_state=True)
    loss = (o.double() * cot).sum() + sum(w.double().pow(2).sum() for w in (*s.weights, *s.momentum))
    grads = torch.autograd.grad(loss, leaves)
    return o.detach(), [w.detach() for w in (*s.weights, *s.momentum)], [g.detach() for g in grads]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--depth", type=int, nargs="+", default=[2, 1])
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(TOLERANCES))
    p.add_argument("--precisions", nargs="+", default=["ieee", "tf32x3", "tf32"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from mnemos.ops.memory_rule import triton_common  # imports triton: after the arguments parse

    bad = set(args.precisions) - set(triton_common.DOT_PRECISIONS)
    if bad:
        p.error(f"--precisions: unknown {sorted(bad)}; known {list(triton_common.DOT_PRECISIONS)}")
    device = torch.device(args.device)
    names = ["o", "final state"] + [f"grad {n}" for n in ("q", "k", "v", "theta", "eta", "alpha")] + ["grad weights"]
    rows = []
    print(f"shape B {args.batch} T {args.seq_len} H {args.heads} D {args.head_dim} E {args.expansion} C "
          f"{args.chunk_size}; reference: impl='torch' in float64 on {device}; relative RMSE (the tests' tolerances "
          f"in brackets)")
    for depth in args.depth:
        residual = depth > 1  # as op_speed's rows: depth 1 without the residual
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            inputs = make_inputs(args.batch, args.seq_len, args.heads, args.head_dim, depth, args.expansion, dtype,
                                 device)
            cot = torch.randn(args.batch, args.seq_len, args.heads, args.head_dim,
                              generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
            # the reference sees the same (rounded) inputs in float64, so only the op's error is measured
            ref = run([x.double() for x in inputs], "torch", args.chunk_size, residual, cot)
            tol_o, tol_g = TOLERANCES[dtype_name]
            for prec in args.precisions:
                triton_common.DOT_PRECISION = prec
                t0 = time.perf_counter()
                got = run(inputs, "triton", args.chunk_size, residual, cot)
                seconds = time.perf_counter() - t0
                errs = [rel_rmse(ref[0], got[0]), max(rel_rmse(a, b) for a, b in zip(ref[1], got[1], strict=True))]
                errs += [rel_rmse(a, b) for a, b in zip(ref[2][:6], got[2][:6], strict=True)]
                errs.append(max(rel_rmse(a, b) for a, b in zip(ref[2][6:], got[2][6:], strict=True)))
                within = errs[0] <= tol_o and errs[1] <= tol_o and all(e <= tol_g for e in errs[2:])
                named = dict(zip(names, errs, strict=True))
                rows.append({"depth": depth, "dtype": dtype_name, "precision": prec, "errors": named,
                             "within_test_tolerance": within, "first_call_s": seconds})
                print(f"depth {depth} {dtype_name:8s} {prec:6s}: " + ", ".join(f"{n} {e:.1e}" for n, e in named.items())
                      + f" [{tol_o:g} / {tol_g:g}]: {'within' if within else 'OUTSIDE'} the tests' tolerance", flush=True)
    triton_common.DOT_PRECISION = "ieee"
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
