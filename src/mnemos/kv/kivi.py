"""KIVI: 2/4/8-bit asymmetric quantisation of the KV cache, stored packed (Liu et al. 2024, arXiv 2402.02750, ICML
2024; sec. 3 eq. 1, Alg. 1).

Quantisation of a group of numbers x (eq. 1): ``z = min x``, ``s = (max x - min x) / (2^b - 1)``,
``q = clamp(round((x - z) / s), 0, 2^b - 1)``, ``x^ = q s + z``. A constant group has s = 0: it is stored with q = 0
and dequantises to z exactly (the reference divides by zero there).

- keys are quantised **per channel**: a group is G consecutive tokens of one channel of one head; keys wait in a
  full-precision residual until R of them have arrived (R a multiple of G), then the R-token block is quantised.
  After n tokens: ``n - n mod R`` quantised keys, ``n mod R`` full precision.
- values are quantised **per token**: a group is G consecutive channels of one token; the full-precision residual is
  a sliding window of the last R values, older ones are quantised one token at a time. After n tokens:
  ``max(0, n - R)`` quantised values, ``min(n, R)`` full precision.
- codes are packed ``8 / b`` per byte (uint8, along the channel dim, low bits first); scales and zero points are kept
  in the cache's dtype: keys ``[B, S_q / G, H, D]``, values ``[B, S_q, H, Dv / G]``.

The tokens of a call are attended at full precision by that call's queries (as the reference's prefill); what later
calls see is dequantised. Nothing is evicted, so positions stay contiguous (a sliding-window layer drops whole key
groups once they have left its window).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnemos.kv.base import NamedTensorsCache, Policy, _check_new, check_int
from mnemos.layers.kv_cache import KVCache, KVView

__all__ = ["KIVI", "KIVICache", "quantize", "dequantize", "pack", "unpack"]

_BITS = (2, 4, 8)


def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max asymmetric quantisation of ``x`` in groups along ``dim`` (KIVI eq. 1).

    Returns ``(codes, scale, zero)``: codes uint8 of x's shape, in ``[0, 2^bits - 1]``; scale and zero float32 of x's
    shape with ``dim`` of size 1. Computed in float32.
    """
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0, x^ = z exactly
    codes = ((xf - lo) / safe).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``q s + z`` (broadcast over the group dim), in the scale's dtype."""
    return codes.to(scale.dtype) * scale + zero


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[..., D]`` of ``bits`` each -> ``[..., D * bits / 8]`` bytes, ``8 / bits`` codes per byte, the
    first in the low bits. D must be a multiple of ``8 / bits``."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)  # [..., D / per, per]
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits  # [per]
    return (c << shifts).sum(dim=-1).to(torch.uint8)  # [..., D / per]


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack``: ``[..., D * bits / 8]`` bytes -> uint8 codes ``[..., D]``."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits  # [per]
    c = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)  # [..., D / per, per]
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


class KIVI(Policy):
    """KIVI's tuning-free asymmetric 2-bit (or 4 / 8-bit) KV cache quantisation (``KIVICache``).

    Args:
        bits: b for keys and values, in {2, 4, 8}; default 2 (KIVI-2). key_bits / value_bits override per tensor.
        group_size: G, default 32; must divide the head dim (value groups run along channels) and R.
        residual: R, the full-precision residual, default 128 (the paper's LongBench runs; its ``example.py`` uses 32).
    """

    def __init__(self, bits: int = 2, *, group_size: int = 32, residual: int = 128, key_bits: int | None = None,
                 value_bits: int | None = None) -> None:
        for name, b in (("bits", bits), ("key_bits", key_bits), ("value_bits", value_bits)):
            if b is not None and (isinstance(b, bool) or b not in _BITS):
                raise ValueError(f"{name} must be one of {_BITS}, got {b!r}")
        self.key_bits = bits if key_bits is None else key_bits
        self.value_bits = bits if value_bits is None else value_bits
        self.group_size = check_int("group_size", group_size, 1)
        self.residual = check_int("residual", residual, 1)
        if residual % group_size:
            raise ValueError(f"residual ({residual}) must be a multiple of group_size ({group_size}): keys are "
                             "quantised in whole residual blocks of groups")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(f"group_size ({self.group_size}) must divide the head dim ({head_dim}): values are "
                             "grouped along channels")
        for name, b in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if head_dim % (8 // b):
                raise ValueError(f"{name}={b} packs {8 // b} codes per byte, which must divide the head dim "
                                 f"({head_dim})")

    def check_layer(self, attn) -> None:
        self.check_head_dim(attn.head_dim)

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        return KIVICache(self, batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype)


class KIVICache(NamedTensorsCache):
    """The packed KIVI cache of one layer (see the module docstring for the layout).

    Holds: ``kq`` uint8 ``[B, Sq, H, D b_k / 8]`` with ``ks``/``kz`` ``[B, Sq / G, H, D]`` and the full-precision
    residual ``kr`` ``[B, Sq_r, H, D]`` (Sq_r < R); ``vq`` uint8 ``[B, Sv, H, Dv b_v / 8]`` with ``vs``/``vz``
    ``[B, Sv, H, Dv / G]`` and ``vr`` ``[B, Sv_r, H, Dv]`` (Sv_r <= R). ``Sq + Sq_r == Sv + Sv_r`` = stored tokens.
    """

    _NAMES = ("kq", "ks", "kz", "kr", "vq", "vs", "vz", "vr")

    def __init__(self, policy: KIVI, batch_size: int, n_heads: int, head_dim: int, *, window: int | None = None,
                 device=None, dtype=None) -> None:
        policy.check_head_dim(head_dim)
        self.policy = policy
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.head_dim = self.value_dim = check_int("head_dim", head_dim, 1)
        self.layer_window = window
        dtype = torch.get_default_dtype() if dtype is None else dtype
        b, h, d, g = batch_size, n_heads, head_dim, policy.group_size
        u8 = dict(device=device, dtype=torch.uint8)
        fp = dict(device=device, dtype=dtype)
        self.kq = torch.empty(b, 0, h, d * policy.key_bits // 8, **u8)
        self.ks, self.kz = torch.empty(b, 0, h, d, **fp), torch.empty(b, 0, h, d, **fp)
        self.kr = torch.empty(b, 0, h, d, **fp)
        self.vq = torch.empty(b, 0, h, d * policy.value_bits // 8, **u8)
        self.vs, self.vz = torch.empty(b, 0, h, d // g, **fp), torch.empty(b, 0, h, d // g, **fp)
        self.vr = torch.empty(b, 0, h, d, **fp)
        self._seen = 0

    # -- introspection -----------------------------------------------------------------------------------------------
    @property
    def window(self) -> int | None:
        return self.layer_window  # at least the last W - 1 tokens are kept, contiguous

    @property
    def num_stored(self) -> int:
        return self.kq.shape[1] + self.kr.shape[1]

    @property
    def num_full_precision(self) -> tuple[int, int]:
        """(keys, values) held at full precision (the residuals)."""
        return self.kr.shape[1], self.vr.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.kr.dtype

    @property
    def device(self) -> torch.device:
        return self.kr.device

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """What the cache holds, as full tensors: keys ``[B, S, H, D]``, values ``[B, S, H, Dv]``."""
        p, g = self.policy, self.policy.group_size
        b, sq, h, _ = self.kq.shape
        d = self.head_dim
        kc = unpack(self.kq, p.key_bits).reshape(b, sq // g, g, h, d)  # [B, Sq/G, G, H, D]
        k = dequantize(kc, self.ks[:, :, None], self.kz[:, :, None]).reshape(b, sq, h, d)
        sv = self.vq.shape[1]
        vc = unpack(self.vq, p.value_bits).reshape(b, sv, h, d // g, g)  # [B, Sv, H, Dv/G, G]
        v = dequantize(vc, self.vs[..., None], self.vz[..., None]).reshape(b, sv, h, d)
        return torch.cat((k.to(self.dtype), self.kr), dim=1), torch.cat((v.to(self.dtype), self.vr), dim=1)

    # -- the policy --------------------------------------------------------------------------------------------------
    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        view = self.update_view(k_new, v_new)
        return view.keys, view.values

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        k_old, v_old = self.dequantized()
        keys = torch.cat((k_old, k_new), dim=1)  # [B, S, H, D]: the call's own tokens at full precision
        values = torch.cat((v_old, v_new), dim=1)
        self._seen += k_new.shape[1]
        self._store(k_new, v_new)
        if self.layer_window is not None:
            self._trim(self.layer_window - 1)
        return KVView(keys, values, None)

    def _store(self, k_new: Tensor, v_new: Tensor) -> None:
        p, g, r = self.policy, self.policy.group_size, self.policy.residual
        b, _, h, d = k_new.shape
        kr = torch.cat((self.kr, k_new), dim=1)
        n_q = (kr.shape[1] // r) * r  # whole residual blocks are quantised, the rest waits
        if n_q:
            blk = kr[:, :n_q].reshape(b, n_q // g, g, h, d)  # [B, n/G, G, H, D]: G tokens of one channel
            codes, s, z = quantize(blk, p.key_bits, dim=2)  # codes [B, n/G, G, H, D], s/z [B, n/G, 1, H, D]
            self.kq = torch.cat((self.kq, pack(codes.reshape(b, n_q, h, d), p.key_bits)), dim=1)
            self.ks = torch.cat((self.ks, s[:, :, 0].to(self.dtype)), dim=1)
            self.kz = torch.cat((self.kz, z[:, :, 0].to(self.dtype)), dim=1)
        self.kr = kr[:, n_q:].clone()
        vr = torch.cat((self.vr, v_new), dim=1)
        n_v = max(0, vr.shape[1] - r)  # the values older than the last R are quantised
        if n_v:
            tok = vr[:, :n_v].reshape(b, n_v, h, d // g, g)  # [B, n, H, Dv/G, G]: G channels of one token
            codes, s, z = quantize(tok, p.value_bits, dim=4)
            self.vq = torch.cat((self.vq, pack(codes.reshape(b, n_v, h, d), p.value_bits)), dim=1)
            self.vs = torch.cat((self.vs, s[..., 0].to(self.dtype)), dim=1)
            self.vz = torch.cat((self.vz, z[..., 0].to(self.dtype)), dim=1)
        self.vr = vr[:, n_v:].clone()

    def _trim(self, keep: int) -> None:
        """Drop the oldest tokens a sliding-window layer can no longer see, in whole key groups (>= keep remain)."""
        g = self.policy.group_size
        extra = self.num_stored - keep
        if extra <= 0:
            return
        sq = self.kq.shape[1]
        drop = (extra // g) * g if extra < sq else sq + (extra - sq)  # whole quantised key groups, else residual too
        if drop == 0:
            return
        dq = min(drop, sq)
        self.kq, self.ks, self.kz = self.kq[:, dq:].clone(), self.ks[:, dq // g:].clone(), self.kz[:, dq // g:].clone()
        self.kr = self.kr[:, drop - dq:].clone()
        sv = self.vq.shape[1]
        dv = min(drop, sv)
        self.vq, self.vs, self.vz = self.vq[:, dv:].clone(), self.vs[:, dv:].clone(), self.vz[:, dv:].clone()
        self.vr = self.vr[:, drop - dv:].clone()

    def _check_loaded(self, state: dict[str, Tensor]) -> None:
        for n in self._NAMES:
            cur, new = getattr(self, n), state[n]
            if new.ndim != 4 or new.shape[0] != cur.shape[0] or new.shape[2:] != cur.shape[2:]:
                raise ValueError(f"state[{n!r}] must be [B={cur.shape[0]}, *, {cur.shape[2]}, {cur.shape[3]}], "
                                 f"got {tuple(new.shape)}")
        g = self.policy.group_size
        sq, sv = state["kq"].shape[1], state["vq"].shape[1]
        if state["ks"].shape[1] * g != sq or state["vs"].shape[1] != sv or \
                sq + state["kr"].shape[1] != sv + state["vr"].shape[1]:
            raise ValueError("state's quantised and residual parts do not line up (token counts differ)")

    def __repr__(self) -> str:
        return (f"KIVICache(policy={self.policy!r}, seen_tokens={self._seen}, num_stored={self.num_stored}, "
                f"full_precision={self.num_full_precision}, nbytes={self.nbytes})")
