"""Analytic FLOP and byte counts for the rows of op_speed.py, one small function per row kind.

Each ``*_counts`` function returns ``{"fwd": {"flops": F, "bytes": N}, "fwdbwd": {"flops": F, "bytes": N}}`` for one
call at the given shape. The numbers are definitions, not measurements: achieved TFLOP/s = flops / time and GB/s =
bytes / time, compared with the matmul and copy ceilings measured in the same run.

FLOPs count the matrix products of the algorithm (a multiply-add is 2 FLOPs); elementwise work (activations, gates,
scalar coefficients, masks) is left out. Unless said otherwise, the backward of a matmul costs two matmuls of its
size, so fwd+bwd = 3 x forward.

Bytes are the compulsory HBM (or DRAM) traffic: every input read once and every output written once.
    forward:  read the inputs (q, k, v, gates, initial state), write the output (and the final state if requested);
    backward: read the same inputs and the output gradient do, write one gradient per input;
    fwd+bwd = forward + backward.
Activations that an implementation saves or recomputes (chunk-boundary states of the memory rule, attention's o and
log-sum-exp) are not compulsory and are not counted, so these byte counts are lower bounds: achieved GB/s computed from
them understates the traffic a kernel really moves.
"""

from __future__ import annotations

from typing import Sequence

Counts = dict[str, dict[str, int]]

BF16, FP32 = 2, 4  # bytes per element


def _chunk_lengths(seq_len: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(n, how many chunks of n tokens)]``: full chunks, then the last partial one (counted at its real length)."""
    full, rest = divmod(seq_len, chunk_size)
    out = [(chunk_size, full)] if full else []
    if rest:
        out.append((rest, 1))
    return out


def _counts(fwd_flops: int, fwd_bytes: int, fwdbwd_flops: int, fwdbwd_bytes: int) -> Counts:
    return {"fwd": {"flops": int(fwd_flops), "bytes": int(fwd_bytes)},
            "fwdbwd": {"flops": int(fwdbwd_flops), "bytes": int(fwdbwd_bytes)}}


# ----------------------------------------------------------------------------------------------------------------------
# The mnemos memory rule (mnemos.ops.neural_memory), chunked dual form


def memory_rule_chunk_flops(n: int, layers: Sequence[tuple[int, int]]) -> int:
    """Forward FLOPs of one chunk of n tokens for one (sequence, head); ``layers`` = [(D_in, D_out)] of W_1..W_L.

    Per layer l with W_l of D_out x D_in (see docs/MEMORY_RULE.md):
        anchor forward       z = a W°ᵀ of the chunk's keys                        2 n D_in D_out
        error backprop       δ_{l-1} = δ_l W°_l (layers after the first only)     2 n D_in D_out
        read                 x Wᵀ and x Sᵀ at the chunk's start state             2 x 2 n D_in D_out
        intra-chunk          (G ⊙ x Aᵀ) Δ: an n x n score and its product         2 n² D_in + 2 n² D_out
        state update         W_n and S_n: one Δᵀ diag(c) A each                  2 x 2 n D_in D_out
    The chunk coefficients (from the gates: an n x n x n and an n x n x 1 product, 2 n³ + 2 n² = 8704 FLOPs at
    n = 16) are left out: 0.14 % of a depth-2 chunk and 1.2 % of a depth-1 chunk at D = 64, E = 4. With them, this
    count equals the matmul FLOPs torch.utils.flop_counter counts in the chunked torch path's forward.
    """
    total = 0
    for i, (d_in, d_out) in enumerate(layers):
        mm = 2 * n * d_in * d_out
        total += mm  # anchor forward
        if i > 0:
            total += mm  # error backpropagated through this layer into the previous one
        total += 2 * mm  # read at W and at S
        total += 2 * n * n * d_in + 2 * n * n * d_out  # intra-chunk dual form
        total += 2 * mm  # carry of W and S
    return total


def memory_rule_counts(
    batch: int,
    seq_len: int,
    heads: int,
    layers: Sequence[tuple[int, int]],
    chunk_size: int,
    *,
    io_bytes: int,
    gate_bytes: int = FP32,
    state_bytes: int = FP32,
    per_sequence_weights: bool = False,
    initial_momentum: bool = False,
    final_state: bool = False,
) -> Counts:
    """``neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=...)``; q, k ``[B, T, H, K]``, v and o
    ``[B, T, H, V]`` with K = layers[0][0], V = layers[-1][1].

    FLOPs: :func:`memory_rule_chunk_flops` summed over every (sequence, head) and chunk (a final partial chunk at its
    real length); fwd+bwd = 3 x forward.
    Bytes: q, k, v, o at ``io_bytes``; three gates per token and head at ``gate_bytes``; the initial weights (shared by
    the batch unless ``per_sequence_weights``) and optional initial momentum at ``state_bytes``; with
    ``final_state``, the final weights and momentum are written (the anchor aliases the weights at a chunk boundary)
    and their gradients read in the backward.
    """
    K, V = layers[0][0], layers[-1][1]
    chunks = _chunk_lengths(seq_len, chunk_size)
    flops = batch * heads * sum(count * memory_rule_chunk_flops(n, layers) for n, count in chunks)
    tokens = batch * seq_len * heads
    qkv = tokens * (2 * K + V) * io_bytes
    gates = tokens * 3 * gate_bytes
    o = tokens * V * io_bytes
    state = heads * sum(d_in * d_out for d_in, d_out in layers) * state_bytes  # one set of weights, [H, D_out, D_in]
    initial = state * (batch if per_sequence_weights else 1) + (batch * state if initial_momentum else 0)
    final = 2 * batch * state if final_state else 0  # W_T and S_T, [B, H, D_out, D_in] each
    fwd_bytes = qkv + gates + initial + o + final
    # backward: read the inputs, do (and the final state's gradients), write one gradient per input
    bwd_bytes = (qkv + gates + initial + o + final) + (qkv + gates + initial)
    return _counts(flops, fwd_bytes, 3 * flops, fwd_bytes + bwd_bytes)


def memory_rule_layers(head_dim: int, depth: int, expansion: int) -> list[tuple[int, int]]:
    """[(D_in, D_out)] of the MLP memory with K = V = head_dim: depth 1 is [(D, D)], depth 2 [(D, E D), (E D, D)]."""
    if depth == 1:
        return [(head_dim, head_dim)]
    hidden = expansion * head_dim
    return [(head_dim, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, head_dim)]


# ----------------------------------------------------------------------------------------------------------------------
# Attention: torch.nn.functional.scaled_dot_product_attention


def sdpa_counts(batch: int, heads: int, seq_len: int, head_dim: int, *, io_bytes: int, causal: bool = True) -> Counts:
    """Softmax attention, q, k, v, o ``[B, H, T, D]``.

    FLOPs: the standard count (as in FlashAttention's benchmarks): forward 4 B H T² D (Q Kᵀ and P V), halved when
    causal; backward 2.5 x forward (five matmuls against two, recomputing Q Kᵀ); fwd+bwd = 3.5 x forward.
    Bytes: forward reads q, k, v and writes o; backward reads q, k, v, do and writes dq, dk, dv.
    """
    fwd = 4 * batch * heads * seq_len * seq_len * head_dim // (2 if causal else 1)
    x = batch * heads * seq_len * head_dim * io_bytes  # one [B, H, T, D] tensor
    return _counts(fwd, 4 * x, fwd + 5 * fwd // 2, 4 * x + 7 * x)


# ----------------------------------------------------------------------------------------------------------------------
# The delta rule, chunked WY form (fla.ops.delta_rule.chunk_delta_rule; Yang et al. 2024, arXiv 2406.06484)


FLA_DELTA_CHUNK = 64  # fla's chunk_delta_rule works on chunks of 64 tokens


def delta_rule_chunk_flops(n: int, key_dim: int, value_dim: int) -> int:
    """Forward FLOPs of one chunk of n tokens for one (sequence, head) of the chunked delta rule, state S of K x V.

        A = strict_tril(diag(β) K Kᵀ)              2 n² K
        T = (I + A)⁻¹, unit lower triangular      n³ / 3 multiply-adds = 2 n³ / 3
        W = T diag(β) K,  U = T diag(β) V          2 n² K + 2 n² V
        V' = U - W S (the chunk's corrected values) 2 n K V
        S += Kᵀ V'                                 2 n K V
        O = Q S + (Q Kᵀ ⊙ M) V'                    2 n K V + 2 n² K + 2 n² V
    Total 6 n² K + 4 n² V + 6 n K V + 2 n³ / 3. The masked n x n products are counted dense, as the kernels compute
    them tile by tile.
    """
    K, V = key_dim, value_dim
    return 6 * n * n * K + 4 * n * n * V + 6 * n * K * V + (2 * n**3) // 3


def delta_rule_counts(
    batch: int,
    seq_len: int,
    heads: int,
    key_dim: int,
    value_dim: int,
    *,
    io_bytes: int,
    beta_bytes: int | None = None,
    chunk_size: int = FLA_DELTA_CHUNK,
) -> Counts:
    """``chunk_delta_rule(q, k, v, beta)``, q, k ``[B, T, H, K]``, v, o ``[B, T, H, V]``, beta ``[B, T, H]``.

    FLOPs: :func:`delta_rule_chunk_flops` over every (sequence, head) and chunk; fwd+bwd = 3 x forward.
    Bytes: forward reads q, k, v, beta and writes o; backward reads them and do, writes dq, dk, dv, dbeta.
    """
    beta_bytes = io_bytes if beta_bytes is None else beta_bytes
    flops = batch * heads * sum(
        count * delta_rule_chunk_flops(n, key_dim, value_dim) for n, count in _chunk_lengths(seq_len, chunk_size)
    )
    tokens = batch * seq_len * heads
    inputs = tokens * ((2 * key_dim + value_dim) * io_bytes + beta_bytes)
    o = tokens * value_dim * io_bytes
    return _counts(flops, inputs + o, 3 * flops, (inputs + o) + (inputs + o + inputs))


# ----------------------------------------------------------------------------------------------------------------------
# Ceilings


def matmul_flops(m: int, n: int, k: int) -> int:
    """``[m, k] @ [k, n]``: 2 m n k."""
    return 2 * m * n * k


def copy_bytes(nbytes: int) -> int:
    """A device-to-device copy of ``nbytes`` reads and writes them: 2 x nbytes."""
    return 2 * nbytes
