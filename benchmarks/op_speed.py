"""Wall time, peak memory and achieved TFLOP/s and GB/s of the sequence-mixing operators alone, against the device's
measured ceilings.

Rows (the registry ``IMPLS`` below), inputs built directly at [B, T, H, D] (K = V = D; no projections, conv or norm):

    op-triton-d2    mnemos.ops.neural_memory(q, k, v, theta, eta, alpha, (W1[H,E*D,D], W2[H,D,E*D]), impl="triton")
    op-torch-d2     the same with impl="torch"
    op-triton-d1    depth 1, (W[H,D,D],), residual=False, with the momentum and decay gates; impl="triton"
    op-torch-d1     the same with impl="torch"
    op-delta        mnemos.ops.delta_rule(q, k, v, beta): the same delta rule in mnemos's exact chunked torch form
    fla-delta       fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta): the delta rule, depth 1 (flash-linear-attention)
    sdpa            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), [B, H, T, D]

The recurrent baselines' rows (issue 16; only with --only), chunks of 64 like op-delta, no FLOP count (the table
shows "-" in the rate columns):

    op-ssd          mnemos.ops.ssd(x, dt, A, B, C): Mamba-2's SSD, x [B, T, H, D], one group of B, C [B, T, 1, N = D]
                    (a D x D state per head, the delta rule's size), dt = softplus(randn - 3), A = -U(1, 16) [H]
    op-based        mnemos.ops.based_linear_attention(q, k, v): BASED's Taylor linear attention, q, k [B, T, H, F = 16]
                    (the layer's and the paper's feature dim; D_phi = 273), v [B, T, H, D]
    op-jrt          mnemos.models.jrt.prefix_linear_attention(q, k, v, k_enc, v_enc) (the function, not the layer):
                    op-based's inputs plus an encoder prefix of M = T / 2 tokens (the paper's 1024 of 2048)
    op-mom          a layer, not an op (MoM has no standalone op): mnemos.models.MixtureOfMemories(H D, H) on
                    x [B, T, H D], with its projections, conv, router and output stage; 4 memories, top 2, shared

q, k are l2-normalised like the layer's; theta = 0.01 sigmoid(randn), eta = sigmoid(randn), alpha = sigmoid(randn - 4),
weights 0.02 randn; everything requires grad and "fwd+bwd" backpropagates (o * g).sum() into all of it. Inputs are
--dtype (default bfloat16 on CUDA, float32 on CPU) except the gates and memory weights, float32 as in the layer. The
script first measures the device's ceilings (a square matmul in that dtype, 8192 on CUDA, and a device-to-device copy
of 1 GiB, read + write counted) and reports each row's achieved TFLOP/s and GB/s against them, from the analytic
counts of benchmarks/flops.py. Triton rows need CUDA (on CPU only with TRITON_INTERPRET=1); fla-delta needs CUDA and
flash-linear-attention; a row that cannot run is listed as skipped or unavailable with the reason. Ratios are taken
against op-triton-d2 when it ran, else op-torch-d2. --depth shapes nothing here: the rows fix their depth (2 or 1).

Method and peak memory: speed_common.py (the same for layer_speed.py).

Usage:
    python benchmarks/op_speed.py --device cuda
    python benchmarks/op_speed.py --seq-len 256 --only op-torch-d2 op-torch-d1 op-delta sdpa   # CPU
    python benchmarks/op_speed.py --only op-delta op-ssd op-based op-mom op-jrt --threads 1   # issue 16's rows
Results are written as JSON (--out, default benchmarks/results/op_speed-<device>.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402  (benchmarks/flops.py: the analytic FLOP and byte counts)
from speed_common import (  # noqa: E402
    Bench,
    Impl,
    Shape,
    add_throughput,
    available,
    ceilings,
    finite,
    fmt_num,
    fmt_ratio,
    main,
    triton_unavailable,
    version,
)


def op_dtype(args: argparse.Namespace) -> torch.dtype:
    return getattr(torch, args.dtype)


def _leaves(*xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.detach().requires_grad_() for x in xs)


class MemoryRuleOp(nn.Module):
    """``mnemos.ops.neural_memory`` on given inputs; returns o [B, T, H, V]."""

    def __init__(self, chunk_size: int, residual: bool, impl: str):
        super().__init__()
        self.chunk_size, self.residual, self.impl = chunk_size, residual, impl

    def forward(self, q, k, v, theta, eta, alpha, *weights):
        from mnemos.ops import neural_memory

        o, _ = neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=self.chunk_size, residual=self.residual,
                             impl=self.impl)
        return o


def build_memory_op(depth: int, impl: str) -> Callable[[Shape, argparse.Namespace], tuple[nn.Module, dict]]:
    def build(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
        residual = depth > 1  # depth 1 without the residual: a plain matrix memory, comparable to the delta rule
        layers = flops.memory_rule_layers(s.head_dim, depth, s.expansion)
        record = {"call": "mnemos.ops.neural_memory", "impl": impl, "chunk_size": s.chunk_size, "residual": residual,
                  "activation": "gelu", "loss": "l2", "weights": [f"[H, {o}, {i}]" for i, o in layers]}
        return MemoryRuleOp(s.chunk_size, residual, impl), record

    return build


def token_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (unit rows, as the layers make them) and v ``[B, T, H, D]`` in the op dtype."""
    B, T, H, D = s.batch, s.seq_len, s.heads, s.head_dim
    dt = op_dtype(args)
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dt)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=device).to(dt)
    return q, k, v


def memory_op_inputs(depth: int) -> Callable[[Shape, argparse.Namespace, torch.device], tuple[Tensor, ...]]:
    def inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
        B, T, H, D = s.batch, s.seq_len, s.heads, s.head_dim
        q, k, v = token_inputs(s, args, device)
        theta = 0.01 * torch.sigmoid(torch.randn(B, T, H, device=device))  # gates and weights float32, as in the layer
        eta = torch.sigmoid(torch.randn(B, T, H, device=device))
        alpha = torch.sigmoid(torch.randn(B, T, H, device=device) - 4)
        weights = [0.02 * torch.randn(H, d_out, d_in, device=device)
                   for d_in, d_out in flops.memory_rule_layers(D, depth, s.expansion)]
        return _leaves(q, k, v, theta, eta, alpha, *weights)

    return inputs


def memory_op_counts(depth: int) -> Callable[[Shape, argparse.Namespace], dict]:
    def counts(s: Shape, args: argparse.Namespace) -> dict:
        layers = flops.memory_rule_layers(s.head_dim, depth, s.expansion)
        io = torch.finfo(op_dtype(args)).bits // 8
        return flops.memory_rule_counts(s.batch, s.seq_len, s.heads, layers, s.chunk_size, io_bytes=io,
                                        gate_bytes=flops.FP32, state_bytes=flops.FP32)

    return counts


class FlaDeltaOp(nn.Module):
    """flash-linear-attention's chunked delta rule; returns o [B, T, H, V]."""

    def __init__(self):
        super().__init__()
        from fla.ops.delta_rule import chunk_delta_rule  # lazily: optional, CUDA only

        self.fn = chunk_delta_rule

    def forward(self, q, k, v, beta):
        o, _ = self.fn(q, k, v, beta)
        return o


class DeltaOp(nn.Module):
    """mnemos's chunked delta rule (ops/delta_rule.py) on fla-delta's inputs; returns o [B, T, H, V]."""

    def forward(self, q, k, v, beta):
        from mnemos.ops import delta_rule

        return delta_rule(q, k, v, beta, chunk_size=flops.FLA_DELTA_CHUNK)[0]


def fla_unavailable(device: torch.device, args: argparse.Namespace) -> str | None:
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    if device.type != "cuda":
        return "fla's chunk_delta_rule runs Triton kernels on CUDA only"
    if args.dtype == "float32":
        return "fla's chunk_delta_rule does not take float32 inputs (--dtype bfloat16)"
    return None


def fla_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    q, k, v = token_inputs(s, args, device)
    beta = torch.sigmoid(torch.randn(s.batch, s.seq_len, s.heads, device=device)).to(op_dtype(args))
    return _leaves(q, k, v, beta)


def fla_counts(s: Shape, args: argparse.Namespace) -> dict:
    io = torch.finfo(op_dtype(args)).bits // 8
    return flops.delta_rule_counts(s.batch, s.seq_len, s.heads, s.head_dim, s.head_dim, io_bytes=io)


class SdpaOp(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    shape = (s.batch, s.heads, s.seq_len, s.head_dim)
    return _leaves(*(torch.randn(shape, device=device).to(op_dtype(args)) for _ in range(3)))


def sdpa_counts(s: Shape, args: argparse.Namespace) -> dict:
    io = torch.finfo(op_dtype(args)).bits // 8
    return flops.sdpa_counts(s.batch, s.heads, s.seq_len, s.head_dim, io_bytes=io, causal=True)


# ----------------------------------------------------------------------------------------------------------------------
# The recurrent baselines' rows (issue 16): Mamba-2's SSD, BASED, JRT-RNN's prefix linear attention, MoM's layer

BASED_FEATURE_DIM = 16  # F: the BASED and JRT-RNN layers' default and the papers' (D_phi = 1 + F + F^2 = 273)


class SsdOp(nn.Module):
    """``mnemos.ops.ssd`` (Mamba-2's chunked SSD); returns y [B, T, H, D]."""

    def forward(self, x, dt, A, B, C):
        from mnemos.ops import ssd

        return ssd(x, dt, A, B, C, chunk_size=flops.FLA_DELTA_CHUNK)[0]


def ssd_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    """x [B, T, H, D], dt [B, T, H] and A [H] (float32, as in the layer), B and C [B, T, 1, N = D]."""
    Bsz, T, H, D = s.batch, s.seq_len, s.heads, s.head_dim
    dt_ = op_dtype(args)
    x = torch.randn(Bsz, T, H, D, device=device).to(dt_)
    dt = F.softplus(torch.randn(Bsz, T, H, device=device) - 3)  # Delta >= 0, about 0.05
    A = -torch.empty(H, device=device).uniform_(1, 16)  # -exp(A_log), Mamba-2's A_log init range
    b = torch.randn(Bsz, T, 1, D, device=device).to(dt_)
    c = torch.randn(Bsz, T, 1, D, device=device).to(dt_)
    return _leaves(x, dt, A, b, c)


class BasedOp(nn.Module):
    """``mnemos.ops.based_linear_attention`` (chunked); returns y [B, T, H, D]."""

    def forward(self, q, k, v):
        from mnemos.ops import based_linear_attention

        return based_linear_attention(q, k, v, chunk_size=flops.FLA_DELTA_CHUNK)[0]


def based_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    """q, k [B, T, H, F] (F = 16), v [B, T, H, D], randn in the op dtype (the layer's are plain projections)."""
    B, T, H, D = s.batch, s.seq_len, s.heads, s.head_dim
    dt = op_dtype(args)
    q, k = (torch.randn(B, T, H, BASED_FEATURE_DIM, device=device).to(dt) for _ in range(2))
    v = torch.randn(B, T, H, D, device=device).to(dt)
    return _leaves(q, k, v)


class JrtOp(nn.Module):
    """``mnemos.models.jrt.prefix_linear_attention`` (the function); returns y [B, T, H, D]."""

    def forward(self, q, k, v, k_enc, v_enc):
        from mnemos.models.jrt import prefix_linear_attention

        return prefix_linear_attention(q, k, v, k_enc, v_enc, chunk_size=flops.FLA_DELTA_CHUNK)[0]


def jrt_prefix_len(s: Shape) -> int:
    return s.seq_len // 2  # the paper's models: M = 1024 of T = 2048


def jrt_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    """op-based's q, k, v and the encoder's k_enc [B, M, H, F], v_enc [B, M, H, D], M = T / 2."""
    B, H, D, M = s.batch, s.heads, s.head_dim, jrt_prefix_len(s)
    dt = op_dtype(args)
    q, k, v = based_inputs(s, args, device)
    k_enc = torch.randn(B, M, H, BASED_FEATURE_DIM, device=device).to(dt)
    v_enc = torch.randn(B, M, H, D, device=device).to(dt)
    return (q, k, v, *_leaves(k_enc, v_enc))


def build_mom_layer(s: Shape, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """MoM's mixer layer at width H D (head dim D), its defaults otherwise, parameters in the op dtype."""
    from mnemos.models.mom import MixtureOfMemories

    dim = s.heads * s.head_dim
    layer = MixtureOfMemories(dim, s.heads, chunk_size=flops.FLA_DELTA_CHUNK).to(op_dtype(args))
    record = {"call": "mnemos.models.mom.MixtureOfMemories (the layer: MoM has no standalone op)", "dim": dim,
              "heads": s.heads, "num_memories": layer.num_memories, "top_k": layer.top_k,
              "shared_memory": layer.shared_memory, "chunk_size": layer.chunk_size,
              "includes": "router, q/k/v projections, short conv, gates, one delta_rule call over (M + 1) H heads, "
                          "gated RMSNorm, output projection"}
    return layer, record


def mom_inputs(s: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    return _leaves(torch.randn(s.batch, s.seq_len, s.heads * s.head_dim, device=device).to(op_dtype(args)))


def call_layer(m: nn.Module, x: Tensor) -> Tensor:
    return m(x)[0]  # (y, state) -> y


def bthd(s: Shape) -> tuple[int, ...]:
    return (s.batch, s.seq_len, s.heads, s.head_dim)


def call_op(m: nn.Module, *inputs: Tensor) -> Tensor:
    return m(*inputs)


def memory_op(name: str, depth: int, impl: str) -> Impl:
    kernel = "Triton kernels" if impl == "triton" else "chunked torch path"
    extra = "" if depth > 1 else ", no residual"
    return Impl(
        name,
        f"memory rule, depth {depth}{extra} ({kernel})",
        build_memory_op(depth, impl),
        call_op,
        inputs=memory_op_inputs(depth),
        out_shape=bthd,
        unavailable=triton_unavailable if impl == "triton" else available,
        counts=memory_op_counts(depth),
        optional=impl == "triton",
    )


IMPLS = {
    "op-triton-d2": memory_op("op-triton-d2", 2, "triton"),
    "op-torch-d2": memory_op("op-torch-d2", 2, "torch"),
    "op-triton-d1": memory_op("op-triton-d1", 1, "triton"),
    "op-torch-d1": memory_op("op-torch-d1", 1, "torch"),
    "fla-delta": Impl("fla-delta", "delta rule, depth 1 (fla chunk_delta_rule)", lambda s, args: (FlaDeltaOp(), {
        "call": "fla.ops.delta_rule.chunk_delta_rule", "chunk_size": flops.FLA_DELTA_CHUNK, "scale": "1/sqrt(D)",
        "flash_linear_attention": version("flash-linear-attention")}), call_op, inputs=fla_inputs,
        out_shape=bthd, unavailable=fla_unavailable, counts=fla_counts, optional=True),
    "op-delta": Impl("op-delta", "delta rule, depth 1 (mnemos.ops.delta_rule, torch)", lambda s, args: (DeltaOp(), {
        "call": "mnemos.ops.delta_rule", "chunk_size": flops.FLA_DELTA_CHUNK}), call_op,
        inputs=fla_inputs, out_shape=bthd, counts=fla_counts),
    "sdpa": Impl("sdpa", "causal softmax attention (torch SDPA)", lambda s, args: (SdpaOp(), {
        "call": "torch.nn.functional.scaled_dot_product_attention", "is_causal": True, "layout": "[B, H, T, D]"}),
        call_op, inputs=sdpa_inputs, out_shape=lambda s: (s.batch, s.heads, s.seq_len, s.head_dim),
        counts=sdpa_counts),
    "op-ssd": Impl("op-ssd", "Mamba-2 SSD, N = D, 1 group (mnemos.ops.ssd, chunks of 64)", lambda s, args: (SsdOp(), {
        "call": "mnemos.ops.ssd", "chunk_size": flops.FLA_DELTA_CHUNK, "groups": 1, "d_state": s.head_dim,
        "dt": "softplus(randn - 3), float32", "A": "-U(1, 16) [H], float32"}), call_op, inputs=ssd_inputs,
        out_shape=bthd),
    "op-based": Impl("op-based", f"BASED Taylor linear attention, F = {BASED_FEATURE_DIM} (mnemos.ops.based)",
        lambda s, args: (BasedOp(), {"call": "mnemos.ops.based_linear_attention", "feature_dim": BASED_FEATURE_DIM,
                                     "chunk_size": flops.FLA_DELTA_CHUNK}), call_op, inputs=based_inputs,
        out_shape=bthd),
    "op-jrt": Impl("op-jrt", "JRT-RNN prefix linear attention, M = T/2 (prefix_linear_attention fn)",
        lambda s, args: (JrtOp(), {"call": "mnemos.models.jrt.prefix_linear_attention (the function)",
                                   "feature_dim": BASED_FEATURE_DIM, "prefix_len": jrt_prefix_len(s),
                                   "chunk_size": flops.FLA_DELTA_CHUNK}), call_op, inputs=jrt_inputs,
        out_shape=bthd),
    "op-mom": Impl("op-mom", "LAYER, not an op: MoM mixer, 4 memories, top 2, shared (models/mom.py)",
        build_mom_layer, call_layer, inputs=mom_inputs,
        out_shape=lambda s: (s.batch, s.seq_len, s.heads * s.head_dim)),
}
REFERENCES = ("op-triton-d2", "op-torch-d2")  # ratios: the first one measured


def columns(row: dict) -> list[str]:
    rates = [fmt_num(row.get(f"{phase}_{key}")) for phase in ("fwd", "fwdbwd")
             for key in ("tflops", "pct_peak", "gbps", "pct_bw")]
    return [*rates, fmt_ratio(row["ratio_fwd"]), fmt_ratio(row["ratio_fwdbwd"]), finite(row)]


def ratio_legend(reference: str | None) -> str:
    ratios = (f"row / the {reference} row at the same T" if reference else
              f"none (no reference row measured: {' or '.join(REFERENCES)})")
    return (f"ratios: {ratios}; peak = extra memory above the inputs; TFLOP/s and GB/s = analytic counts "
            "(benchmarks/flops.py) / median time; %peak and %bw: shares of the ceilings above")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="the dtype of q, k, v (default bfloat16 on CUDA, float32 on CPU)")


BENCH = Bench(
    name="op_speed",
    description=__doc__.split("\n\n")[0],
    script=Path(__file__).resolve(),
    impls=IMPLS,
    default_rows=["op-triton-d2", "op-torch-d2", "op-triton-d1", "op-torch-d1", "op-delta", "fla-delta", "sdpa"],
    references=REFERENCES,
    autocast=False,
    default_dtype=lambda device: "bfloat16" if device == "cuda" else "float32",
    header=lambda ref: ["computes", "fwd TFLOP/s", "%peak", "GB/s", "%bw", "f+b TFLOP/s", "%peak", "GB/s", "%bw",
                        f"fwd vs {ref}", f"f+b vs {ref}", "finite"],
    columns=columns,
    ratio_legend=ratio_legend,
    add_arguments=add_arguments,
    config=lambda args, shape: {
        "dtype": f"{args.dtype} q, k, v (fla-delta: beta too); memory-rule gates and weights float32",
        "inputs": "q, k l2-normalised randn; v randn; theta = 0.01 sigmoid(randn), eta = sigmoid(randn), "
                  "alpha = sigmoid(randn - 4); memory weights 0.02 randn; fla beta = sigmoid(randn); "
                  "sdpa q, k, v randn [B, H, T, D]; op-ssd x, B, C randn (N = D, 1 group), dt = softplus(randn - 3), "
                  "A = -U(1, 16) (dt, A float32); op-based / op-jrt q, k randn [B, T, H, 16], v randn, op-jrt "
                  "k_enc, v_enc randn over a prefix of T / 2; op-mom x randn [B, T, H D] into the MoM layer "
                  "(parameters in the op dtype)",
        "fwdbwd": "forward + o.backward(g) (the backward of (o * g).sum()) into every input",
        "depths": "op-*-d2: depth 2, expansion E, residual; op-*-d1: depth 1, no residual (--depth is not used)",
        "counts": "benchmarks/flops.py: matmul FLOPs of the algorithm, compulsory bytes (inputs read once, "
                  "outputs written once); achieved rates use the median time",
    },
    describe=lambda args, shape, env: [
        f"q, k, v {args.dtype} (memory-rule gates and weights float32), depth 2 (E={shape.expansion}) and 1; "
        f"triton {env['triton'] or 'not installed'}, flash-linear-attention "
        f"{env['flash_linear_attention'] or 'not installed'}, TRITON_INTERPRET={env['triton_interpret'] or 'unset'}, "
        f"kernels' float32 dot precision {env.get('triton_dot_precision', 'ieee')} (MNEMOS_TRITON_DOT_PRECISION)"],
    before_rows=lambda device, args: ceilings(device, op_dtype(args)),
    after_row=add_throughput,
)


if __name__ == "__main__":
    main(BENCH)
