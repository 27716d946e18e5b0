"""Composition: a token-eviction policy decides which entries stay, and KIVI stores them packed (``compose(H2O(256),
KIVI(2))``; spec ``h2o:budget=256+kivi:bits=2``; Scissorhands' paper combines its eviction with 4-bit quantisation
the same way) or ThinK stores their keys narrower (``compose(SnapKV(256), ThinK(0.5))``; spec
``snapkv:budget=256+think:pruning_ratio=0.5``; the ThinK paper applies its channel pruning on top of SnapKV and H2O).

``ThinKComposedCache`` is the eviction cache whose kept keys, except the last ``recent`` kept entries, are stored at
the ``D - floor(lambda D)`` channels ThinK chose at the first call (from that call's last ``window_size`` queries and
its keys, as ThinK alone chooses them), their indices once per row and head. Each call widens the stored keys with
zeros in the pruned channels (what attention reads), lets the eviction policy attend, score and keep on those, then
narrows the kept keys that are no longer among the last ``recent``. The first call's eviction sees full-width keys,
so a prefill-time policy (SnapKV, PyramidKV) keeps exactly the entries it keeps alone.

``ComposedCache`` is the eviction cache (``EvictingKVCache``: the same scores, budgets, kept positions, per-entry
state) whose kept keys and values are held in KIVI's layout over the *kept* entries, in position order, instead of
at full precision: keys per channel in groups of G consecutive kept entries, the first ``n - n mod R`` of the n kept
entries quantised and the rest at full precision; values per token (groups of G channels), all but the last R
quantised (KIVI's residual rules with n = entries kept). Each call dequantises what is stored, lets the eviction
policy attend, score and keep as usual (the call's own tokens at full precision), then quantises the kept entries
again. With nothing evicted this is exactly KIVI's cache (re-quantising a dequantised group reproduces its codes);
when entries leave from the middle, the key groups after them are re-formed and re-quantised from their dequantised
values, so a key may be quantised more than once (each time within half a step of that group's scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mnemos.kv.base import EvictingKVCache, EvictionPolicy, Policy
from mnemos.kv.kivi import KIVI, dequantize, pack, quantize, unpack
from mnemos.kv.think import ThinK, choose_channels, widen_keys
from mnemos.layers.kv_cache import KVCache, KVView

__all__ = ["Composed", "ComposedCache", "ThinKComposedCache", "compose"]


class Composed(Policy):
    """An eviction policy whose kept entries KIVI or ThinK stores (``compose``); ``eviction`` and ``storage`` (also
    ``kivi`` or ``think``, whichever it is) are the parts."""

    def __init__(self, eviction: EvictionPolicy, storage: KIVI | ThinK) -> None:
        if not isinstance(eviction, EvictionPolicy):
            raise ValueError(f"eviction must be a token-eviction policy (StreamingLLM, H2O, SnapKV, PyramidKV, "
                             f"L2Norm, Scissorhands, D2O), got {type(eviction).__name__}")
        if not isinstance(storage, (KIVI, ThinK)):
            raise ValueError(f"the second policy must be KIVI or ThinK (how the kept entries are stored), got "
                             f"{type(storage).__name__}")
        self.eviction, self.storage = eviction, storage
        self.kivi = storage if isinstance(storage, KIVI) else None
        self.think = storage if isinstance(storage, ThinK) else None
        self.needs_queries = eviction.needs_queries or self.think is not None

    def check_layer(self, attn) -> None:
        self.eviction.check_layer(attn)
        self.storage.check_layer(attn)

    def check_head_dim(self, head_dim: int) -> None:
        if self.kivi is not None:
            self.kivi.check_head_dim(head_dim)

    def prepare(self, model) -> None:
        self.eviction.prepare(model)

    def prepare_hf(self, model) -> None:
        """The eviction policy's scoring pass on a Hugging Face model, if it has one (``mnemos.kv.hf``)."""
        prepare = getattr(self.eviction, "prepare_hf", None)
        if prepare is not None:
            prepare(model)

    def hf_refusal(self) -> str | None:
        return self.eviction.hf_refusal() or self.storage.hf_refusal()

    def mac_refusal(self) -> str | None:
        return self.eviction.mac_refusal() or self.storage.mac_refusal()

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        if self.eviction.skips_layer(layer_idx, n_layers):  # the eviction policy leaves the layer: storage alone
            return self.storage.make_cache(batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype)
        cls = ComposedCache if self.kivi is not None else ThinKComposedCache
        return cls(self.eviction, self.storage, batch_size, n_heads, head_dim, window=window, layer_idx=layer_idx,
                   n_layers=n_layers, rope=rope, device=device, dtype=dtype)


def _tokens_in_bytes(n: int, stored_bytes, per_token_floor: float) -> int:
    """The most entries S whose storage ``stored_bytes(S)`` (bytes per sequence) fits in ``n``: a scan down from the
    bound that the cheapest per-token cost ``per_token_floor`` allows (the cost is not monotone in S: KIVI packs keys
    by whole residual blocks, so one more entry can cost less)."""
    s = int(n // per_token_floor) + 1
    while s > 0 and stored_bytes(s) > n:
        s -= 1
    return s


def compose(eviction: EvictionPolicy, storage: KIVI | ThinK) -> Composed:
    """``eviction``'s kept entries stored by ``storage``, KIVI (packed) or ThinK (narrower keys): the module
    docstring."""
    return Composed(eviction, storage)


class ComposedCache(EvictingKVCache):
    """The eviction cache with KIVI storage: ``kq`` uint8 ``[B, Sq, H, D b_k / 8]``, ``ks``/``kz`` ``[B, Sq / G, H,
    D]``, ``kr`` ``[B, S - Sq, H, D]``; ``vq`` ``[B, Sv, H, D b_v / 8]``, ``vs``/``vz`` ``[B, Sv, H, D / G]``, ``vr``
    ``[B, S - Sv, H, D]``; plus the eviction cache's positions and per-entry state (S = entries kept)."""

    _PACKED = ("kq", "ks", "kz", "kr", "vq", "vs", "vz", "vr")

    def __init__(self, eviction: EvictionPolicy, kivi: KIVI, batch_size: int, n_heads: int, head_dim: int, *,
                 window=None, layer_idx: int = 0, n_layers: int = 1, rope=None, device=None, dtype=None) -> None:
        kivi.check_head_dim(head_dim)
        super().__init__(eviction, batch_size, n_heads, head_dim, window=window, layer_idx=layer_idx,
                         n_layers=n_layers, rope=rope, device=device, dtype=dtype)
        self.kivi = kivi
        self._quantize(self._k, self._v)

    # -- storage -----------------------------------------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        """The stored positions ``[B, S, H]`` and packed tensors (before a call: what ``_quantize`` may reuse)."""
        return (self._pos.long(), *(getattr(self, n) for n in self._PACKED))

    def _quantize(self, k: Tensor, v: Tensor, old: tuple | None = None) -> None:
        """Store ``k``/``v`` ``[B, S, H, D]`` (the kept entries, at ``self._pos``) in KIVI's layout (the module
        docstring) and drop the full tensors. With ``old`` (``_snapshot`` before the call, then the dequantised keys
        and values it held), a value entry that was already quantised, and a key group whose G entries were already
        one quantised group, keep their codes, scales and zero points if their values are unchanged (D2O's merge
        changes some): only new, changed or re-formed groups are quantised (so nothing is quantised twice unless an
        eviction re-formed its group or a merge changed it)."""
        p, g, r = self.kivi, self.kivi.group_size, self.kivi.residual
        b, n, h, d = k.shape
        n_k = n - n % r
        blk = k[:, :n_k].reshape(b, n_k // g, g, h, d)  # [B, n/G, G, H, D]: G entries of one channel
        codes, ks, kz = quantize(blk, p.key_bits, dim=2)
        kq, ks, kz = pack(codes.reshape(b, n_k, h, d), p.key_bits), ks[:, :, 0].to(k.dtype), kz[:, :, 0].to(k.dtype)
        n_v = max(0, n - r)
        tok = v[:, :n_v].reshape(b, n_v, h, d // g, g)  # [B, n, H, D/G, G]: G channels of one entry
        codes, vs, vz = quantize(tok, p.value_bits, dim=4)
        vq, vs, vz = pack(codes.reshape(b, n_v, h, d), p.value_bits), vs[..., 0].to(v.dtype), vz[..., 0].to(v.dtype)
        if old is not None and old[0].shape[1] and n:
            kq, ks, kz, vq, vs, vz = self._reuse(old, k, v, n_k, n_v, kq, ks, kz, vq, vs, vz)
        self.kq, self.ks, self.kz, self.kr = kq, ks, kz, k[:, n_k:].clone()
        self.vq, self.vs, self.vz, self.vr = vq, vs, vz, v[:, n_v:].clone()
        self._k, self._v = k[:, :0].clone(), v[:, :0].clone()  # nothing at full precision beyond the residuals

    def _reuse(self, old: tuple, k: Tensor, v: Tensor, n_k: int, n_v: int, kq, ks, kz, vq, vs, vz):
        """Freshly quantised tensors with the entries / key groups ``old`` already held, unchanged, copied back."""
        pos_old, okq, oks, okz, _, ovq, ovs, ovz, _, old_k, old_v = old
        g = self.kivi.group_size
        po = pos_old.permute(0, 2, 1).contiguous()  # [B, H, So]
        pn = self._pos.long().permute(0, 2, 1).contiguous()  # [B, H, S]
        j = torch.searchsorted(po, pn)  # [B, H, S]: where each kept entry sat before
        jc = j.clamp(max=po.shape[-1] - 1)
        match = (j < po.shape[-1]) & (po.gather(-1, jc) == pn)  # [B, H, S]: held before the call
        jt = jc.permute(0, 2, 1)  # [B, S, H]
        nv_old = ovq.shape[1]
        if n_v and nv_old:
            src = jt[:, :n_v].clamp(max=nv_old - 1)  # [B, n_v, H]
            same = (v[:, :n_v] == old_v.gather(1, src[..., None].expand(*src.shape, v.shape[-1]))).all(-1)
            reuse = (match[..., :n_v] & (j[..., :n_v] < nv_old)).permute(0, 2, 1) & same  # [B, n_v, H]
            vq = torch.where(reuse[..., None], ovq.gather(1, src[..., None].expand(*src.shape, ovq.shape[-1])), vq)
            vs = torch.where(reuse[..., None], ovs.gather(1, src[..., None].expand(*src.shape, ovs.shape[-1])), vs)
            vz = torch.where(reuse[..., None], ovz.gather(1, src[..., None].expand(*src.shape, ovz.shape[-1])), vz)
        nk_old = okq.shape[1]
        if n_k and nk_old:
            b, _, h = jt.shape
            first = j[..., 0:n_k:g]  # [B, H, n_k/G]: where each new group's first entry sat
            offs = torch.arange(g, device=pn.device)
            runs = j[..., :n_k].reshape(b, h, n_k // g, g) == first[..., None] + offs  # consecutive before
            src = jt[:, :n_k].clamp(max=nk_old - 1)  # [B, n_k, H]
            same = (k[:, :n_k] == old_k.gather(1, src[..., None].expand(*src.shape, k.shape[-1]))).all(-1)
            ok = match[..., :n_k] & same.permute(0, 2, 1)  # [B, H, n_k]: held before, unchanged
            whole = ok.reshape(b, h, n_k // g, g).all(-1) & runs.all(-1)
            intact = whole & (first % g == 0) & (first + g <= nk_old)  # [B, H, n_k/G]: an old group, unchanged
            reuse = intact.repeat_interleave(g, dim=-1).permute(0, 2, 1)  # [B, n_k, H]
            kq = torch.where(reuse[..., None], okq.gather(1, src[..., None].expand(*src.shape, okq.shape[-1])), kq)
            grp = (first // g).clamp(max=oks.shape[1] - 1).permute(0, 2, 1)  # [B, n_k/G, H]
            use = intact.permute(0, 2, 1)[..., None]
            ks = torch.where(use, oks.gather(1, grp[..., None].expand(*grp.shape, oks.shape[-1])), ks)
            kz = torch.where(use, okz.gather(1, grp[..., None].expand(*grp.shape, okz.shape[-1])), kz)
        return kq, ks, kz, vq, vs, vz

    def stored_bytes(self, s: int) -> int:
        """Bytes per sequence that ``s`` kept entries take in this storage: positions and per-entry state, keys
        packed in whole residual blocks (codes, and per group of G entries a scale and a zero point per channel) with
        the rest at full precision, values packed beyond the last R (codes, a scale and a zero point per G channels)."""
        p, h, d, e = self.kivi, self.n_heads, self.head_dim, self.kr.element_size()
        g, r = p.group_size, p.residual
        n_k, n_v = s - s % r, max(0, s - r)
        keys = n_k * d * p.key_bits // 8 + (n_k // g) * 2 * d * e + (s - n_k) * d * e
        values = n_v * d * p.value_bits // 8 + n_v * 2 * (d // g) * e + (s - n_v) * d * e
        return h * (s * (4 + 4 * len(self._state)) + keys + values)

    def tokens_in_bytes(self, n: int) -> int:
        p, d = self.kivi, self.head_dim
        floor = self.n_heads * (4 + 4 * len(self._state) + d * (p.key_bits + p.value_bits) / 8)
        return _tokens_in_bytes(n, self.stored_bytes, floor)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """The kept keys ``[B, S, H, D]`` and values, as attention reads them."""
        p, g = self.kivi, self.kivi.group_size
        b, sq, h, _ = self.kq.shape
        d = self.head_dim
        kc = unpack(self.kq, p.key_bits).reshape(b, sq // g, g, h, d)
        k = dequantize(kc, self.ks[:, :, None], self.kz[:, :, None]).reshape(b, sq, h, d).to(self.kr.dtype)
        sv = self.vq.shape[1]
        vc = unpack(self.vq, p.value_bits).reshape(b, sv, h, d // g, g)
        v = dequantize(vc, self.vs[..., None], self.vz[..., None]).reshape(b, sv, h, d).to(self.vr.dtype)
        return torch.cat((k, self.kr), dim=1), torch.cat((v, self.vr), dim=1)

    @property
    def num_stored(self) -> int:
        return self._pos.shape[1]

    @property
    def keys(self) -> Tensor:
        return self.dequantized()[0]

    @property
    def values(self) -> Tensor:
        return self.dequantized()[1]

    # -- the policy --------------------------------------------------------------------------------------------------
    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        self._k, self._v = self.dequantized()
        old = (*self._snapshot(), self._k, self._v)
        try:
            view = super().update_view(k_new, v_new, q)
        finally:
            self._quantize(self._k, self._v, old)
        return view

    def reset(self) -> None:
        super().reset()
        self._quantize(self._k, self._v)

    def to(self, device=None, dtype=None) -> "ComposedCache":
        super().to(device=device, dtype=dtype)
        for n in self._PACKED:
            t = getattr(self, n)
            setattr(self, n, t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        return self

    # -- serialisation -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        out = super().state_dict()
        del out["k"], out["v"]  # empty: the entries are in the packed tensors
        return {**{n: getattr(self, n) for n in self._PACKED}, **out}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self._PACKED) - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}, got keys {sorted(state)}")
        saved = {n: getattr(self, n) for n in self._PACKED}
        for n in self._PACKED:
            setattr(self, n, state[n].to(device=self.device))
        try:
            k, v = self.dequantized()
        except RuntimeError as e:
            for n, t in saved.items():
                setattr(self, n, t)
            raise ValueError(f"state's packed tensors do not fit this cache: {e}") from None
        rest = {n: t for n, t in state.items() if n not in self._PACKED}
        try:
            super().load_state_dict({**rest, "k": k, "v": v})  # checks shapes, restores positions and state
        except ValueError:
            for n, t in saved.items():
                setattr(self, n, t)
            raise
        for n in self._PACKED:  # the packed tensors as saved (not re-quantised: bit-identical)
            t = getattr(self, n)
            setattr(self, n, t.to(dtype=self._k.dtype if t.is_floating_point() else t.dtype).clone())
        self._k, self._v = self._k[:, :0].clone(), self._v[:, :0].clone()

    def __repr__(self) -> str:
        return (f"ComposedCache(eviction={self.policy!r}, kivi={self.kivi!r}, seen_tokens={self._seen}, "
                f"num_stored={self.num_stored}, nbytes={self.nbytes})")


class ThinKComposedCache(EvictingKVCache):
    """The eviction cache with ThinK's key storage (the module docstring): narrow kept keys ``kp`` ``[B, Sp, H, Dk]``
    at the channels ``channels`` ``[B, H, Dk]`` (int16, chosen at the first call), the last ``recent`` kept keys at
    full width ``kf`` ``[B, S - Sp, H, D]``; values, positions and the policy's per-entry state as the eviction cache
    keeps them."""

    _STORED = ("kp", "channels", "kf")

    def __init__(self, eviction: EvictionPolicy, think: ThinK, batch_size: int, n_heads: int, head_dim: int, *,
                 window=None, layer_idx: int = 0, n_layers: int = 1, rope=None, device=None, dtype=None) -> None:
        super().__init__(eviction, batch_size, n_heads, head_dim, window=window, layer_idx=layer_idx,
                         n_layers=n_layers, rope=rope, device=device, dtype=dtype)
        self.think = think
        dk = head_dim - think.n_pruned(head_dim)
        self.kp = self._k.new_empty(batch_size, 0, n_heads, dk)
        self.channels = torch.zeros(batch_size, n_heads, dk, device=self._k.device, dtype=torch.int16)
        self.kf = self._k.clone()

    def widened_keys(self) -> Tensor:
        """The kept keys at full width ``[B, S, H, D]``, zeros in the pruned channels of the narrow ones."""
        return torch.cat((widen_keys(self.kp, self.channels, self.head_dim), self.kf), dim=1)

    def stored_bytes(self, s: int) -> int:
        """Bytes per sequence that ``s`` kept entries take: positions, per-entry state and values, the last ``recent``
        keys at full width and the others at the kept channels (the channel choice itself is a fixed cost)."""
        h, d, e = self.n_heads, self.head_dim, self.kf.element_size()
        full = min(s, self.think.recent)
        keys = full * d * e + (s - full) * self.kp.shape[3] * e
        return h * (s * (4 + 4 * len(self._state) + self.value_dim * e) + keys)

    def tokens_in_bytes(self, n: int) -> int:
        floor = self.n_heads * (4 + 4 * len(self._state) + (self.value_dim + self.kp.shape[3]) * self.kf.element_size())
        return _tokens_in_bytes(n, self.stored_bytes, floor)

    def _narrow(self, k: Tensor) -> None:
        """Store the kept keys ``k`` ``[B, S, H, D]``: all but the last ``recent`` at the chosen channels."""
        b, n, h, _ = k.shape
        n_old = max(0, n - self.think.recent)
        idx = self.channels.long()[:, None].expand(b, n_old, h, self.kp.shape[3])
        self.kp, self.kf = k[:, :n_old].gather(3, idx), k[:, n_old:].clone()
        self._k = k[:, :0].clone()

    @property
    def num_stored(self) -> int:
        return self._pos.shape[1]

    @property
    def keys(self) -> Tensor:
        return self.widened_keys()

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        if self._seen == 0:
            if q is None:
                raise ValueError("ThinK chooses key channels from the first call's queries: update_view needs q")
            self.channels = choose_channels(q, k_new, self.think.window_size, self.kp.shape[3])
        self._k = self.widened_keys()
        try:
            return super().update_view(k_new, v_new, q)
        finally:
            self._narrow(self._k)

    def reset(self) -> None:
        super().reset()
        self.channels = torch.zeros_like(self.channels)
        self._narrow(self._k)

    def to(self, device=None, dtype=None) -> "ThinKComposedCache":
        super().to(device=device, dtype=dtype)
        self.kp, self.kf = self.kp.to(device=device, dtype=dtype), self.kf.to(device=device, dtype=dtype)
        self.channels = self.channels.to(device=device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        out = super().state_dict()
        del out["k"]  # empty: the keys are kp / kf
        return {**{n: getattr(self, n) for n in self._STORED}, **out}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self._STORED) - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}, got keys {sorted(state)}")
        kp, ch, kf = (state[n] for n in self._STORED)
        if tuple(ch.shape) != tuple(self.channels.shape) or kp.ndim != 4 or kp.shape[3] != self.kp.shape[3] or \
                kf.ndim != 4 or kf.shape[3] != self.head_dim:
            raise ValueError(f"state's kp / channels / kf must be [B, Sp, H, {self.kp.shape[3]}] / "
                             f"{tuple(self.channels.shape)} / [B, Sf, H, {self.head_dim}], got {tuple(kp.shape)} / "
                             f"{tuple(ch.shape)} / {tuple(kf.shape)}")
        saved = {n: getattr(self, n) for n in self._STORED}
        self.kp, self.kf = kp.to(device=self.device, dtype=self.dtype), kf.to(device=self.device, dtype=self.dtype)
        self.channels = ch.to(device=self.device, dtype=torch.int16)
        rest = {n: t for n, t in state.items() if n not in self._STORED}
        try:
            super().load_state_dict({**rest, "k": self.widened_keys()})  # checks shapes, restores the rest
        except ValueError:
            for n, t in saved.items():
                setattr(self, n, t)
            raise
        self.kp, self.kf = self.kp.clone(), self.kf.clone()
        self._k = self._k[:, :0].clone()

    def __repr__(self) -> str:
        return (f"ThinKComposedCache(eviction={self.policy!r}, think={self.think!r}, seen_tokens={self._seen}, "
                f"num_stored={self.num_stored}, narrow={self.kp.shape[1]}, nbytes={self.nbytes})")
