"""Wall time and peak memory of the Titans neural-memory layer: mnemos vs titans-pytorch (lucidrains), side by side.

Rows (the registry ``IMPLS`` below), all at one shape ``x [B, T, dim]`` with H heads of D, an MLP memory of depth L
and hidden width E * D, chunk size C:

    mnemos          mnemos.layers.NeuralMemory(dim, heads=H, head_dim=D, depth=L, expansion=E, chunk_size=C)
                    gradients anchored at the end of the previous chunk (Titans §3.2, the paper's semantics)
    titans-default  titans_pytorch.NeuralMemory(dim, chunk_size=C, batch_size=None, dim_head=D, heads=H,
                    model=MemoryMLP(dim=D, depth=L, expansion_factor=E), default_step_transform_max_lr=0.1)
                    its default: every gradient of the call anchored at the weights at the start of the call
    titans-paper    the same with batch_size=C: the anchor moves to the end of every chunk (the paper's semantics)
    mnemos-torch    mnemos with NeuralMemory(..., impl="torch")   (the chunked torch path; --only)
    mnemos-triton   mnemos with NeuralMemory(..., impl="triton")  (the fused Triton kernels; --only)

titans-default and mnemos compute different things; only the anchors of titans-paper match mnemos (other
differences remain, printed with the table). titans-pytorch's inner learning-rate bound is set to 0.1
(--titans-max-lr; its own default 1.0 drives the titans-paper forward to NaN on random inputs); mnemos's layer keeps
its own bound, ``max_lr`` (recorded with the row).

Method and peak memory: speed_common.py (the same for op_speed.py). "fwd+bwd" backpropagates ``y.backward(g)`` with
x requiring grad; ratios are taken against the mnemos row at the same T. --dtype bfloat16 runs the rows under
torch.autocast with float32 parameters and input. Before the rows, the device's matmul (and copy) ceiling is measured
as op_speed.py measures it; the mnemos rows print their matrix-product FLOPs per second (``mnemos_counts``) and that
rate's share of the ceiling.

Usage:
    python benchmarks/layer_speed.py                       # CPU, B2 T2048 dim256 H4x64 L2 E4 C16
    python benchmarks/layer_speed.py --device cuda         # CUDA, B4 T4096 dim512 H8x64 L2 E4 C16
    python benchmarks/layer_speed.py --seq-len 256 --only mnemos titans-paper
Results are written as JSON (--out, default benchmarks/results/layer_speed-<device>.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402  (benchmarks/flops.py: the analytic FLOP counts)
from speed_common import (  # noqa: E402
    Bench,
    Impl,
    Shape,
    add_throughput,
    ceilings,
    finite,
    fmt_num,
    fmt_ratio,
    main,
    triton_unavailable,
)

ANCHOR_NOTE = (
    "NOTE: titans-pytorch's default (batch_size=None) anchors EVERY gradient at the weights at the start of the call "
    "(one anchor for the whole sequence), while mnemos anchors at each chunk (gradient at the state after the previous "
    "chunk: the Titans paper's semantics). The two compute different things. titans-paper (batch_size = chunk size) "
    "moves titans-pytorch's anchor every chunk, as in the paper."
)
OTHER_DIFFERENCES_NOTE = (
    "Other differences remain even for titans-paper: titans-pytorch takes momentum and decay gates per chunk (from the "
    "chunk's mean input) and applies the summed gradient of a chunk once, so each token reads the memory as of the "
    "last completed chunk; mnemos steps momentum and decay per token and reads the per-token state after the token's "
    "own write. Blocks differ too (titans-pytorch: pre-RMSNorm, no conv, LayerNorm+residual around the memory MLP, "
    "mean-squared loss, sigmoid head gate; mnemos: causal conv + SiLU, l2-normalised q/k, summed squared loss, gated "
    "RMSNorm output)."
)


def layer_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    """The layer rows' input: x [B, T, dim], requiring grad."""
    return (torch.randn(s.batch, s.seq_len, s.dim, device=device, requires_grad=True),)


def build_mnemos(impl: str | None = None):
    """mnemos's layer; ``impl`` is passed to NeuralMemory when given (None: its default, "auto")."""

    def build(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
        from mnemos.layers import NeuralMemory

        kwargs = dict(
            dim=s.dim, heads=s.heads, head_dim=s.head_dim, depth=s.depth, expansion=s.expansion, chunk_size=s.chunk_size
        )
        if impl is not None:
            kwargs["impl"] = impl
        layer = NeuralMemory(**kwargs)
        return layer, {"class": "mnemos.layers.NeuralMemory", **kwargs, "impl": layer.impl, "max_lr": layer.max_lr}

    return build


def build_titans(per_chunk: bool):
    """titans-pytorch's layer; ``per_chunk``: batch_size = chunk size (anchor every chunk), else None (its default)."""

    def build(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
        from titans_pytorch import MemoryMLP, NeuralMemory

        kwargs = dict(
            dim=s.dim,
            chunk_size=s.chunk_size,
            batch_size=s.chunk_size if per_chunk else None,
            dim_head=s.head_dim,
            heads=s.heads,
            default_step_transform_max_lr=args.titans_max_lr,
        )
        model_kwargs = dict(dim=s.head_dim, depth=s.depth, expansion_factor=float(s.expansion))
        layer = NeuralMemory(**kwargs, model=MemoryMLP(**model_kwargs))
        record = {"class": "titans_pytorch.NeuralMemory", **kwargs, "model": f"MemoryMLP(**{model_kwargs})"}
        return layer, record

    return build


def call_layer(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)[0]


def mnemos_counts(s: Shape, args: argparse.Namespace) -> dict:
    """The FLOPs of mnemos's layer: the memory rule's matrix products (benchmarks/flops.py, the same count as
    ``torch.utils.flop_counter`` on the torch path less the gates' coefficients) and the layer's linear maps (q, k, v,
    gates, output: 2 B T in out each), fwd+bwd 3 x forward; elementwise work and the short convs left out. The bytes
    are the rule's compulsory ones (a lower bound, not shown). titans-pytorch's rows compute other things and get
    no count."""
    from mnemos.layers import NeuralMemory

    layer = NeuralMemory(dim=s.dim, heads=s.heads, head_dim=s.head_dim, depth=s.depth, expansion=s.expansion,
                         chunk_size=s.chunk_size)
    linear = sum(2 * s.batch * s.seq_len * m.in_features * m.out_features for m in layer.modules()
                 if isinstance(m, nn.Linear))
    rule = flops.memory_rule_counts(s.batch, s.seq_len, s.heads, flops.memory_rule_layers(s.head_dim, s.depth,
                                    s.expansion), s.chunk_size, io_bytes=flops.FP32)
    return {phase: {"flops": c["flops"] + (1 if phase == "fwd" else 3) * linear, "bytes": c["bytes"]}
            for phase, c in rule.items()}


def layer(name: str, semantics: str, build, **kw) -> Impl:
    return Impl(name, semantics, build, call_layer, inputs=layer_inputs,
                out_shape=lambda s: (s.batch, s.seq_len, s.dim), **kw)


IMPLS = {
    "mnemos": layer("mnemos", "per chunk (paper)", build_mnemos(), counts=mnemos_counts),
    "titans-default": layer("titans-default", "start of call (batch_size=None)", build_titans(per_chunk=False)),
    "titans-paper": layer("titans-paper", "per chunk (batch_size=C)", build_titans(per_chunk=True)),
    "mnemos-torch": layer("mnemos-torch", "per chunk (paper)", build_mnemos("torch"), counts=mnemos_counts),
    "mnemos-triton": layer("mnemos-triton", "per chunk (paper)", build_mnemos("triton"), unavailable=triton_unavailable,
                           optional=True, counts=mnemos_counts),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="bfloat16 = torch.autocast with float32 parameters and input (default float32)")
    p.add_argument("--titans-max-lr", type=float, default=0.1,
                   help="titans-pytorch default_step_transform_max_lr (its default 1.0)")


BENCH = Bench(
    name="layer_speed",
    description=__doc__.split("\n\n")[0],
    script=Path(__file__).resolve(),
    impls=IMPLS,
    default_rows=["mnemos", "titans-default", "titans-paper"],
    references=("mnemos",),
    autocast=True,
    default_dtype=lambda device: "float32",
    header=lambda ref: ["semantics (gradient anchor)", "fwd vs mnemos", "f+b vs mnemos", "peak vs mnemos",
                        "f+b TFLOP/s", "%peak", "finite"],
    columns=lambda row: [fmt_ratio(row["ratio_fwd"]), fmt_ratio(row["ratio_fwdbwd"]),
                         fmt_ratio(row["ratio_peak_fwdbwd"]), fmt_num(row.get("fwdbwd_tflops")),
                         fmt_num(row.get("fwdbwd_pct_peak")), finite(row)],
    ratio_legend=lambda ref: ("ratios: row / the mnemos row at the same T (> 1 = slower or more memory than mnemos); "
                              "peak = extra memory above model and input; TFLOP/s = the mnemos layer's matrix-product "
                              "FLOPs (layer_speed.mnemos_counts) / median time, %peak its share of the matmul "
                              "ceiling above (titans-pytorch computes other things: no count)"),
    aliases={"titans": ["titans-default", "titans-paper"]},
    add_arguments=add_arguments,
    config=lambda args, shape: {
        "dtype": args.dtype if args.dtype == "float32" else "bfloat16 (torch.autocast; parameters and input float32)",
        "fwdbwd": "forward + y.backward(g), x requires grad",
        "titans_max_lr": args.titans_max_lr,
    },
    describe=lambda args, shape, env: [f"titans-pytorch {env['titans_pytorch'] or 'not installed'}"],
    notes=lambda rows: [ANCHOR_NOTE, OTHER_DIFFERENCES_NOTE] if any(n.startswith("titans") for n in rows) else [],
    before_rows=lambda device, args: ceilings(device, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32),
    after_row=add_throughput,
)


if __name__ == "__main__":
    main(BENCH)
