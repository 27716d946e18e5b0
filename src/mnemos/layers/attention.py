"""Short-term memory: causal softmax attention with RoPE, sliding windows, a visible prefix, and a KV cache.

Three pieces, from the bottom up:

- ``causal_attention(q, k, v, *, window, prefix, ...)``: the functional op over ``[B, T, H, D]`` tensors, with
  ``causal_attention_reference`` (a dense mask + softmax, for tests) beside it under the same signature.
- ``KVCache`` policies (``mnemos.layers.kv_cache``): ``FullKVCache`` and ``RollingKVCache``; eviction, compression
  and quantisation policies (``mnemos.kv``) attach to a layer with ``Attention.set_kv_policy``. A cache whose kept
  keys are not a contiguous run (``KVView.positions`` not None) is attended with ``positional_attention``: the same
  visibility rule, read from each key's original position.
- ``Attention``: the layer (projections, RoPE, persistent-memory tokens, the op, output projection) with
  ``forward(x, cache) -> (y, cache)`` for both a full sequence and streaming decoding.

Masks, in one picture. Keys are ``[prefix (P entries) || sequence (S entries)]``; the Tq queries are the *last* Tq
sequence positions (query i sits at sequence position ``S - Tq + i``; with Tq == S that is plain self-attention, and
with a cache the earlier S - Tq keys come from the past). Query at position p sees

- every prefix key (persistent-memory tokens, MAC's retrieved-memory tokens: visible to all, not causal);
- sequence key at position n iff ``n <= p`` (causal) and, with a window W, ``p - n < W`` (it sees W keys:
  p-W+1 .. p; Longformer, Beltagy et al. 2020, arXiv 2004.05150; Mistral 7B, Jiang et al. 2023, arXiv 2310.06825).

Segment-local masks (Titans MAC, Behrouz et al. 2024, arXiv 2501.00663, sec. 4.1: attention over
``[persistent || h || segment]``) are one call per segment with ``prefix = N_p + N_h``, keys
``[persistent || h || segment]`` and queries the segment's tokens; to run all segments of a long sequence at once,
fold the segments into the batch dimension (``[B, T, H, D] -> [B * T/N, N, H, D]``) and prepend each segment's own
prefix.

Compute paths (all through ``torch.nn.functional.scaled_dot_product_attention`` with boolean masks, any device):

- no window, or a window covering every key: one SDPA call. With no prefix and Tq == S it uses ``is_causal`` (no
  mask tensor at all, and the fused causal kernels); otherwise a ``[Tq, P + S]`` boolean mask.
- a sliding window narrower than the sequence: queries are processed in blocks of ``block_size``; a block of Bq
  queries gathers only the ``P + Bq + W - 1`` keys it can see, so each SDPA call builds a ``[Bq, P + Bq + W - 1]``
  mask and score block and peak memory is O(Bq * (Bq + W)) per batch-head, i.e. O(T * W) rather than O(T^2).

FlexAttention (block-sparse masks on GPU) is not wired in yet; the blocked SDPA path is what runs on CUDA too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnemos.layers.kv_cache import FullKVCache, KVCache, KVPolicy, RollingKVCache
from mnemos.layers.rope import RotaryEmbedding

__all__ = ["causal_attention", "causal_attention_reference", "positional_attention", "Attention"]

# Query-block size of the sliding-window path when the caller gives none: about W (so a block's mask is ~2W^2, i.e.
# the total work is ~2x the T*W useful entries), at least 64 (so tiny windows do not loop once per token) and at most
# 1024 (so a huge window still gets a bounded [Bq, Bq + W] block).
_MIN_BLOCK, _MAX_BLOCK = 64, 1024


def _default_block_size(window: int) -> int:
    return max(_MIN_BLOCK, min(window, _MAX_BLOCK))


def _sdpa_supports_gqa() -> bool:
    """``enable_gqa`` arrived in torch 2.5; older versions repeat the key/value heads instead."""
    try:
        x = torch.zeros(1, 2, 1, 1)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


_HAS_ENABLE_GQA = _sdpa_supports_gqa()


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    """SDPA on head-first tensors ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]``.

    The single place the op calls SDPA, so tests can wrap it to record the size of every mask / key block built.
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads == n_kv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if _HAS_ENABLE_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    group = n_heads // n_kv
    k = k.repeat_interleave(group, dim=1)  # [B, H, Tk, D]: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)  # [B, H, Tk, Dv]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def _check_attention_args(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, prefix: int, scale: float | None, block_size: int | None
) -> None:
    """Validate the public op's arguments (shared by the fast op and the reference; computes nothing)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [B, T, H, D] tensor (rank 4), got {shape}")
    b, _, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"q, k, v must share the batch size B, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k's head dim must equal q's ({d}), got k of shape {tuple(k.shape)}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"v must be [B, Tk, Hkv, Dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    h_kv = k.shape[2]
    if h % h_kv != 0:
        raise ValueError(f"q's heads ({h}) must be a multiple of k/v heads ({h_kv}) for grouped-query attention")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"window must be None or a positive integer, got {window!r}")
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"prefix must be a non-negative integer, got {prefix!r}")
    if prefix > k.shape[1]:
        raise ValueError(f"prefix ({prefix}) cannot exceed the number of keys Tk={k.shape[1]}")
    if k.shape[1] - prefix < q.shape[1]:
        raise ValueError(
            f"k must hold at least one sequence key per query: Tk - prefix = {k.shape[1]} - {prefix} "
            f"< Tq = {q.shape[1]}"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be None or a positive number, got {scale!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be None or a positive integer, got {block_size!r}")


def _visible_mask(
    q_start: int, n_q: int, k_start: int, n_k: int, prefix: int, window: int | None, device: torch.device
) -> Tensor:
    """Boolean ``[n_q, prefix + n_k]``: queries at positions q_start.. vs [prefix || keys at positions k_start..]."""
    qp = torch.arange(q_start, q_start + n_q, device=device)[:, None]  # [n_q, 1]
    kp = torch.arange(k_start, k_start + n_k, device=device)[None, :]  # [1, n_k]
    seen = kp <= qp  # [n_q, n_k] causal
    if window is not None:
        seen = seen & (qp - kp < window)  # [n_q, n_k] and inside the window
    if prefix == 0:
        return seen
    return torch.cat((seen.new_ones(n_q, prefix), seen), dim=1)  # [n_q, prefix + n_k]


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    prefix: int = 0,
    scale: float | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Causal softmax attention, optionally with a sliding window and a visible prefix, over ``[B, T, H, D]``.

    Args:
        q: ``[B, Tq, H, D]`` queries (already rotated by RoPE if used).
        k: ``[B, Tk, Hkv, D]`` keys, ``[prefix || sequence]``; H must be a multiple of Hkv (grouped-query
            attention: query head h reads key/value head ``h // (H / Hkv)``).
        v: ``[B, Tk, Hkv, Dv]`` values.
        window: None for full causal attention; W >= 1 for a sliding window (the query at sequence position p sees
            sequence keys p-W+1 .. p; Longformer / Mistral). The prefix is never windowed.
        prefix: P >= 0, the number of leading keys every query sees (persistent memory: Titans, arXiv 2501.00663,
            sec. 3.3; MAC's retrieved-memory tokens). Default 0.
        scale: softmax temperature; default ``1 / sqrt(D)``.
        block_size: queries per block on the sliding-window path (default: W clamped to [64, 1024]). It changes
            memory and speed, never the result (up to float rounding).

    The Tq queries are aligned with the *last* Tq of the S = Tk - P sequence keys (query i at position S - Tq + i),
    so Tq == S is self-attention over a whole sequence and Tq < S is decoding with S - Tq cached keys in front.

    Returns:
        ``[B, Tq, H, Dv]``.

    Example:
        >>> q, k, v = (torch.randn(2, 7, 4, 8) for _ in range(3))
        >>> causal_attention(q, k, v, window=3).shape
        torch.Size([2, 7, 4, 8])
    """
    _check_attention_args(q, k, v, window, prefix, scale, block_size)
    b, n_q, h, d = q.shape
    n_seq = k.shape[1] - prefix  # S sequence keys
    q_start = n_seq - n_q  # sequence position of query 0
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if n_q == 0:
        return q.new_empty(b, 0, h, v.shape[3])  # [B, 0, H, Dv]
    qh = q.transpose(1, 2)  # [B, H, Tq, D]
    kh = k.transpose(1, 2)  # [B, Hkv, Tk, D]
    vh = v.transpose(1, 2)  # [B, Hkv, Tk, Dv]

    if window is None or window >= n_seq:
        # the window (if any) covers every key: plain causal attention in one call
        if prefix == 0 and n_q == n_seq:
            out = _sdpa(qh, kh, vh, None, True, scale)  # [B, H, Tq, Dv]
        elif n_q == 1:
            out = _sdpa(qh, kh, vh, None, False, scale)  # [B, H, 1, Dv]: a single last query sees every key
        else:
            mask = _visible_mask(q_start, n_q, 0, n_seq, prefix, None, q.device)  # [Tq, P + S]
            out = _sdpa(qh, kh, vh, mask, False, scale)  # [B, H, Tq, Dv]
        return out.transpose(1, 2)  # [B, Tq, H, Dv]

    bq = _default_block_size(window) if block_size is None else block_size
    k_pre, v_pre = kh[:, :, :prefix], vh[:, :, :prefix]  # [B, Hkv, P, D], [B, Hkv, P, Dv]
    outs = []
    for s in range(0, n_q, bq):
        e = min(s + bq, n_q)
        lo = max(0, q_start + s - window + 1)  # first sequence key any query of the block can see
        hi = q_start + e  # one past the last (the block's last query itself)
        kb = kh[:, :, prefix + lo : prefix + hi]  # [B, Hkv, hi - lo, D]
        vb = vh[:, :, prefix + lo : prefix + hi]  # [B, Hkv, hi - lo, Dv]
        if prefix:
            kb = torch.cat((k_pre, kb), dim=2)  # [B, Hkv, P + hi - lo, D]
            vb = torch.cat((v_pre, vb), dim=2)  # [B, Hkv, P + hi - lo, Dv]
        mask = _visible_mask(q_start + s, e - s, lo, hi - lo, prefix, window, q.device)  # [Bq, P + hi - lo]
        outs.append(_sdpa(qh[:, :, s:e], kb, vb, mask, False, scale))  # [B, H, Bq, Dv]
    return torch.cat(outs, dim=2).transpose(1, 2)  # [B, H, Tq, Dv] -> [B, Tq, H, Dv]


def _positional_visibility(
    q_pos: Tensor, k_pos: Tensor, window: int | None, prefix: int, n_heads: int
) -> Tensor:
    """Boolean ``[B, H, Tq, P + S]``: query at position ``q_pos[i]`` (``[Tq]``) sees sequence key j of head h iff
    ``k_pos[b, j, h] <= q_pos[i]`` and, with a window W, ``q_pos[i] - k_pos[b, j, h] < W``; prefix keys are visible
    to all. ``k_pos`` is ``[B, S, Hkv]``; each key/value head's row is repeated for its query heads."""
    b, _, h_kv = k_pos.shape
    kp = k_pos.permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, 1, S]
    qp = q_pos.to(k_pos.device)[None, None, :, None]  # [1, 1, Tq, 1]
    seen = kp <= qp  # [B, Hkv, Tq, S]
    if window is not None:
        seen = seen & (qp - kp < window)
    seen = seen.repeat_interleave(n_heads // h_kv, dim=1)  # [B, H, Tq, S]: query head h reads kv head h // group
    if prefix == 0:
        return seen
    return torch.cat((seen.new_ones(b, n_heads, q_pos.numel(), prefix), seen), dim=3)  # [B, H, Tq, P + S]


def positional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    window: int | None = None,
    prefix: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Causal attention over keys at explicit positions (a cache that evicted entries from the middle).

    Args:
        q: ``[B, Tq, H, D]`` queries at positions ``q_pos`` (``[Tq]`` int).
        k, v: ``[B, P + S, Hkv, D]`` / ``[B, P + S, Hkv, Dv]``: P prefix entries (visible to all), then S sequence
            entries at positions ``k_pos`` (``[B, S, Hkv]`` int, per batch row and key/value head).
        window, prefix, scale: as in ``causal_attention``.

    With ``k_pos`` a contiguous run ending at the queries this equals ``causal_attention``. Builds the dense
    ``[B, H, Tq, P + S]`` mask (caches under a policy hold a bounded number of entries).

    Returns:
        ``[B, Tq, H, Dv]``.
    """
    _check_attention_args(q, k, v, window, prefix, scale, None)
    b, n_q, h, d = q.shape
    want = (b, k.shape[1] - prefix, k.shape[2])
    if k_pos.ndim != 3 or tuple(k_pos.shape) != want:
        raise ValueError(f"k_pos must be [B, S, Hkv] = {want}, got {tuple(k_pos.shape)}")
    if q_pos.ndim != 1 or q_pos.numel() != n_q:
        raise ValueError(f"q_pos must be [Tq={n_q}], got {tuple(q_pos.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = _positional_visibility(q_pos, k_pos, window, prefix, h)  # [B, H, Tq, P + S]
    out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, False, scale)  # [B, H, Tq, Dv]
    return out.transpose(1, 2)  # [B, Tq, H, Dv]


def _reference_mask(n_q: int, n_k: int, window: int | None, prefix: int) -> Tensor:
    """The dense ``[Tq, Tk]`` visibility matrix, written one query row at a time (deliberately not vectorised)."""
    mask = torch.zeros(n_q, n_k, dtype=torch.bool)
    n_seq = n_k - prefix
    for i in range(n_q):
        p = n_seq - n_q + i  # this query's sequence position
        mask[i, :prefix] = True  # the prefix is visible to everyone
        first = 0 if window is None else max(0, p - window + 1)
        mask[i, prefix + first : prefix + p + 1] = True  # sequence keys first .. p
    return mask


def causal_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    prefix: int = 0,
    scale: float | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Dense reference for ``causal_attention`` (same signature, same result; O(Tq * Tk) memory).

    Builds the full ``[Tq, Tk]`` mask row by row, then ``softmax(q k^T * scale + mask) v`` with plain einsums in the
    input dtype (use float64 for tests). ``block_size`` is accepted for signature parity and ignored.
    """
    _check_attention_args(q, k, v, window, prefix, scale, block_size)
    b, n_q, h, d = q.shape
    h_kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k = k.repeat_interleave(h // h_kv, dim=2)  # [B, Tk, H, D]
    v = v.repeat_interleave(h // h_kv, dim=2)  # [B, Tk, H, Dv]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [B, H, Tq, Tk]
    mask = _reference_mask(n_q, k.shape[1], window, prefix).to(q.device)  # [Tq, Tk]
    scores = scores.masked_fill(~mask, float("-inf"))  # [B, H, Tq, Tk]
    probs = torch.softmax(scores, dim=-1)  # [B, H, Tq, Tk]
    return torch.einsum("bhij,bjhd->bihd", probs, v)  # [B, Tq, H, Dv]


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, an optional sliding window and persistent-memory tokens.

    ``x [B, T, d_model] -> q [B, T, H, D], k/v [B, T, Hkv, D] -> RoPE(q, k) at absolute positions ->
    causal_attention over [persistent || prefix_kv || cached + new keys] -> [B, T, H*D] -> output projection``.

    Args:
        d_model: model width.
        n_heads: H query heads.
        head_dim: D; default ``d_model // n_heads`` (then n_heads must divide d_model). Must be even (RoPE).
        n_kv_heads: Hkv key/value heads (grouped-query attention, Ainslie et al. 2023, arXiv 2305.13245); must divide
            n_heads. Default n_heads (plain multi-head attention).
        window: None (full causal) or W >= 1 (sliding window: Longformer, arXiv 2004.05150; Mistral,
            arXiv 2310.06825). ``init_state`` then returns a ``RollingKVCache(W)``, memory O(W).
        num_persistent: number of persistent-memory tokens (Titans, Behrouz et al. 2024, arXiv 2501.00663, sec. 3.3):
            learned, input-independent keys and values (``persistent_k``/``persistent_v``, ``[P, Hkv, D]``) placed in
            front of every key sequence and visible to every query. They live in key/value space (as in
            lucidrains' titans-pytorch) rather than as input tokens run through the projections, and they are not
            rotated by RoPE: they have no position.
        rope_base: RoPE frequency base (Su et al. 2021, arXiv 2104.09864).
        bias: whether the four projections have biases.
        block_size: query-block size of the sliding-window path (see ``causal_attention``).

    ``forward(x, cache=None, prefix_kv=None)``: with ``cache=None`` x is a whole sequence starting at position 0
    and the returned cache is None; with a cache (from ``init_state``) x continues the stream at
    ``cache.seen_tokens`` (any number of tokens per call) and the same cache object, updated, is returned.
    ``prefix_kv = (k, v)``, each ``[B, Np, Hkv, D]``, adds caller-supplied prefix entries after the persistent ones
    (e.g. MAC's retrieved-memory tokens h, projected by the caller); they are not cached or rotated.

    ``set_kv_policy(policy, layer_idx, n_layers)`` attaches a cache policy (``mnemos.kv``; ``kv_policy`` holds it,
    None by default): ``init_state`` then returns the policy's cache, which sees each call's queries and may evict,
    re-rotate, narrow or quantise what it stores (``mnemos.kv.apply_kv_policy`` sets it on every layer of a model).

    Example:
        >>> attn = Attention(d_model=32, n_heads=4, window=8, num_persistent=2)
        >>> x = torch.randn(2, 10, 32)
        >>> y, _ = attn(x)
        >>> cache = attn.init_state(2, x.device, x.dtype)
        >>> y1, cache = attn(x[:, :6], cache)
        >>> y2, cache = attn(x[:, 6:], cache)
        >>> torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-5)
        True
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        n_kv_heads: int | None = None,
        window: int | None = None,
        num_persistent: int = 0,
        rope_base: float = 10000.0,
        bias: bool = False,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model}) when head_dim is not given")
            head_dim = d_model // n_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {head_dim!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads must be a positive integer, got {n_kv_heads!r}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"window must be None or a positive integer, got {window!r}")
        if isinstance(num_persistent, bool) or not isinstance(num_persistent, int) or num_persistent < 0:
            raise ValueError(f"num_persistent must be a non-negative integer, got {num_persistent!r}")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0
        ):
            raise ValueError(f"block_size must be None or a positive integer, got {block_size!r}")

        self.d_model, self.n_heads, self.head_dim, self.n_kv_heads = d_model, n_heads, head_dim, n_kv_heads
        self.window, self.num_persistent, self.block_size = window, num_persistent, block_size
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.rope = RotaryEmbedding(head_dim, base=rope_base)
        self.kv_policy: KVPolicy | None = None  # a cache policy for init_state (set_kv_policy); None: the default
        self.kv_layer = (0, 1)  # (this layer's index, the number of attention layers) the policy is told
        if num_persistent:
            # small random init: identical (e.g. zero) tokens would receive identical gradients and never separate
            self.persistent_k = nn.Parameter(torch.randn(num_persistent, n_kv_heads, head_dim) * 0.02)
            self.persistent_v = nn.Parameter(torch.randn(num_persistent, n_kv_heads, head_dim) * 0.02)
        else:
            self.register_parameter("persistent_k", None)
            self.register_parameter("persistent_v", None)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, n_kv_heads={self.n_kv_heads}, "
            f"window={self.window}, num_persistent={self.num_persistent}"
        )

    def set_kv_policy(self, policy: KVPolicy | None, layer_idx: int = 0, n_layers: int = 1) -> None:
        """Use ``policy`` for the caches ``init_state`` makes from now on (None: back to the default caches);
        ``layer_idx`` / ``n_layers`` place the layer among the model's attention layers (per-layer budgets)."""
        if policy is not None and not isinstance(policy, KVPolicy):
            raise ValueError(f"policy must be a KVPolicy (mnemos.kv) or None, got {type(policy).__name__}")
        for name, val in (("layer_idx", layer_idx), ("n_layers", n_layers)):
            if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "layer_idx" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'layer_idx' else 'positive'} "
                                 f"integer, got {val!r}")
        if layer_idx >= n_layers:
            raise ValueError(f"layer_idx ({layer_idx}) must be < n_layers ({n_layers})")
        self.kv_policy, self.kv_layer = policy, (layer_idx, n_layers)

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty cache for ``batch`` streams: the policy's (``set_kv_policy``) if one is set, else
        ``RollingKVCache(window)`` with a window, else ``FullKVCache``.

        ``device`` and ``dtype`` default to the layer's parameters'; pass the activations' dtype under autocast.
        """
        device = self.q_proj.weight.device if device is None else device
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        if self.kv_policy is not None:
            layer_idx, n_layers = self.kv_layer
            return self.kv_policy.make_cache(
                batch, self.n_kv_heads, self.head_dim, window=self.window, layer_idx=layer_idx, n_layers=n_layers,
                rope=self.rope, device=device, dtype=dtype,
            )
        if self.window is None:
            return FullKVCache(batch, self.n_kv_heads, self.head_dim, device=device, dtype=dtype)
        return RollingKVCache(self.window, batch, self.n_kv_heads, self.head_dim, device=device, dtype=dtype)

    def _check_forward_args(
        self, x: Tensor, cache: KVCache | None, prefix_kv: tuple[Tensor, Tensor] | None
    ) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[2] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got {shape}")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache must be a KVCache (see init_state) or None, got {type(cache).__name__}")
            if cache.window is not None and (self.window is None or cache.window < self.window):
                raise ValueError(
                    f"cache keeps only the last {cache.window} tokens but this layer's window is {self.window}"
                )
        if prefix_kv is not None:
            if not isinstance(prefix_kv, (tuple, list)) or len(prefix_kv) != 2:
                raise ValueError(f"prefix_kv must be a (k, v) pair, got {type(prefix_kv).__name__}")
            pk, pv = prefix_kv
            want = (x.shape[0], self.n_kv_heads, self.head_dim)
            for name, t in (("prefix_kv[0]", pk), ("prefix_kv[1]", pv)):
                if not isinstance(t, Tensor) or t.ndim != 4 or (t.shape[0], t.shape[2], t.shape[3]) != want:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{name} must be [B={want[0]}, Np, Hkv={want[1]}, D={want[2]}], got {shape}")
            if pk.shape[1] != pv.shape[1]:
                raise ValueError(f"prefix_kv's k and v must have the same Np, got {pk.shape[1]} and {pv.shape[1]}")

    def forward(
        self, x: Tensor, cache: KVCache | None = None, prefix_kv: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, KVCache | None]:
        """``x [B, T, d_model] -> (y [B, T, d_model], cache)``; see the class docstring for the cache semantics."""
        self._check_forward_args(x, cache, prefix_kv)
        b, t, _ = x.shape
        start = 0 if cache is None else cache.seen_tokens  # absolute position of x's first token
        offset = 0 if cache is None else cache.rope_offset  # where RoPE puts it (== start unless keys are re-rotated)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        q = self.rope(q, offset=offset)  # [B, T, H, D] at positions offset .. offset + T - 1
        k = self.rope(k, offset=offset)  # [B, T, Hkv, D]
        k_pos = None
        if cache is not None:
            k, v, k_pos = cache.update_view(k, v, q=q)  # [B, S, Hkv, D]: visible past keys followed by the T new ones

        pre_k, pre_v = [], []
        if self.persistent_k is not None:
            pre_k.append(self.persistent_k.to(k.dtype).expand(b, -1, -1, -1))  # [B, P, Hkv, D]
            pre_v.append(self.persistent_v.to(v.dtype).expand(b, -1, -1, -1))  # [B, P, Hkv, D]
        if prefix_kv is not None:
            pre_k.append(prefix_kv[0].to(k.dtype))  # [B, Np, Hkv, D]
            pre_v.append(prefix_kv[1].to(v.dtype))  # [B, Np, Hkv, D]
        n_prefix = sum(p.shape[1] for p in pre_k)
        if pre_k:
            k = torch.cat((*pre_k, k), dim=1)  # [B, P + Np + S, Hkv, D]
            v = torch.cat((*pre_v, v), dim=1)  # [B, P + Np + S, Hkv, D]

        if k_pos is None:  # a contiguous run of keys ending at the queries
            o = causal_attention(q, k, v, window=self.window, prefix=n_prefix, block_size=self.block_size)
        else:  # a policy kept a subset: mask by each key's original position
            q_pos = torch.arange(start, start + t, device=x.device)  # [T]
            o = positional_attention(q, k, v, q_pos, k_pos, window=self.window, prefix=n_prefix)  # [B, T, H, D]
        y = self.o_proj(o.reshape(b, t, self.n_heads * self.head_dim))  # [B, T, H * D] -> [B, T, d_model]
        return y, cache
