"""The retrieval tier: InfLLM (fixed-size blocks) and SentenceKV (sentences), with an offload store.

Distant tokens' keys and values leave the resident cache for an *offload tier* (``OffloadStore``: host memory when
``offload_device="cpu"`` and the model is on an accelerator; on a CPU-only machine a separate store on the same
device, counted separately). They are grouped into units, each with a vector that stays resident: InfLLM's blocks of
``block_size`` tokens with a representative key, SentenceKV's sentences with the mean of their keys. Every call
attends to the attention sinks, the resident recent tokens, the call's own tokens and the units retrieved for it:
the top-k by the dot product of the call's (mean) query with the units' vectors, per batch row and key/value head
(each group's query heads summed: GQA-aware, nothing expanded to query heads).

Per tier (``tier_nbytes()``): ``resident`` is everything on the compute device (sink and recent keys / values, the
units' vectors, the per-token and per-sentence bookkeeping), ``offloaded`` the store's keys and values. ``nbytes``
(every tensor of ``state_dict``) is their sum; ``index_nbytes`` is the resident part that is not keys / values, so
``resident - index_nbytes + offloaded`` are the bytes of every held token's key and value (the full cache's bytes
when nothing was dropped). ``kept_positions()`` lists every held position, both tiers; ``resident_positions()`` the
resident ones. The only read of the store is ``OffloadStore.gather``; set ``store.trace = []`` to record every
``(row, store index, head)`` it reads.

The algorithms, their defaults and every reading of an ambiguous paper point are in docs/KV.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mnemos.kv.base import Policy, _check_new, attention_probs, check_int
from mnemos.layers.kv_cache import KVCache, KVView

__all__ = ["InfLLM", "SentenceKV", "InfLLMCache", "SentenceKVCache", "OffloadStore", "install_token_id_hook",
           "BYTE_BOUNDARY_IDS"]

_HIDDEN = 2**62  # a position no query reaches: padding entries are masked out
_IDS_HOOK = "_mnemos_kv_token_id_hook"
_SCORE_CHUNK = 512  # queries per chunk when InfLLM scores a call's attention (bounds the [c, S] probabilities)
# mnemos' ByteTokenizer: '.', '!', '?', '\n' (ids are the UTF-8 bytes)
BYTE_BOUNDARY_IDS = (46, 33, 63, 10)


class OffloadStore:
    """The offload tier of one cache: keys ``k`` ``[B, N, H, D]`` and values ``v`` ``[B, N, H, Dv]`` of N
    consecutive positions (the same for every row and head), on its own device. Read only through ``gather``;
    ``trace`` (None, or a list) records every ``(row, index, head)`` read. The cache replaces the object instead of
    changing it, so shallow copies of a cache (``Cache.reorder``) never share a store they write."""

    def __init__(self, k: Tensor, v: Tensor, trace: list | None = None) -> None:
        self.k, self.v, self.trace = k, v, trace

    def __len__(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def appended(self, k: Tensor, v: Tensor) -> "OffloadStore":
        """A store with ``k``/``v`` ``[B, n, H, D]`` appended (copied to the store's device)."""
        dev = self.k.device
        return OffloadStore(torch.cat((self.k, k.to(dev)), dim=1), torch.cat((self.v, v.to(dev)), dim=1), self.trace)

    def without_front(self, n: int) -> "OffloadStore":
        """A store without its first ``n`` entries."""
        return OffloadStore(self.k[:, n:].clone(), self.v[:, n:].clone(), self.trace) if n else self

    def gather(self, idx: Tensor, valid: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """Entries ``idx`` ``[B, K, H]`` (store indices per row and head) -> keys ``[B, K, H, D]`` and values on
        ``device``. With ``valid`` ``[B, K, H]``, only the valid entries are read; the others come back as zeros."""
        b, kk, h = idx.shape
        dev = self.k.device
        idx = idx.to(dev)
        if valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        bi, ki, hi = valid.to(dev).nonzero(as_tuple=True)
        ni = idx[bi, ki, hi]
        out_k = self.k.new_zeros(b, kk, h, self.k.shape[-1])
        out_v = self.v.new_zeros(b, kk, h, self.v.shape[-1])
        out_k[bi, ki, hi] = self.k[bi, ni, hi]  # the read: only the selected rows of the store
        out_v[bi, ki, hi] = self.v[bi, ni, hi]
        if self.trace is not None:
            self.trace.extend(zip(bi.tolist(), ni.tolist(), hi.tolist(), strict=True))
        return out_k.to(device), out_v.to(device)


def _check_offload_device(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise ValueError(f"offload_device must be None or a device name such as 'cpu', got {value!r}")
    try:
        torch.device(value)
    except RuntimeError:
        raise ValueError(f"offload_device must be None or a device name such as 'cpu', got {value!r}") from None
    return str(value)


class _TieredKVCache(KVCache):
    """What both retrieval caches share: sinks ``sk``/``sv`` (positions below ``n_sinks``), the resident tail
    ``rk``/``rv`` (the most recent positions, not yet offloaded) and the store (the positions between them).

    Positions are implied: the tail holds ``[seen - nr, seen)``, the store the N positions before it, the sinks
    ``[hi - ns, hi)`` with ``hi = min(n_sinks, seen)``. Subclasses add resident tensors (``_EXTRA``), choose what to
    retrieve (``_select``), score the call (``_after_attention``) and cut units from the tail (``_offload``)."""

    _EXTRA: tuple[str, ...] = ()  # resident non-K/V tensors (batch-first), part of state_dict

    def __init__(self, n_sinks: int, batch_size: int, n_heads: int, head_dim: int, *, window: int | None,
                 device, dtype, offload_device: str | None) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.head_dim = self.value_dim = check_int("head_dim", head_dim, 1)
        self.n_sinks, self.layer_window = n_sinks, window
        dtype = torch.get_default_dtype() if dtype is None else dtype
        b, h, d = batch_size, n_heads, head_dim
        self.sk = torch.empty(b, 0, h, d, device=device, dtype=dtype)
        self.sv = torch.empty(b, 0, h, d, device=device, dtype=dtype)
        self.rk = torch.empty(b, 0, h, d, device=device, dtype=dtype)
        self.rv = torch.empty(b, 0, h, d, device=device, dtype=dtype)
        off = self.sk.device if offload_device is None else torch.device(offload_device)
        self.store = OffloadStore(torch.empty(b, 0, h, d, device=off, dtype=dtype),
                                  torch.empty(b, 0, h, d, device=off, dtype=dtype))
        self._seen = 0

    # -- introspection -----------------------------------------------------------------------------------------------
    @property
    def window(self) -> int | None:
        return None  # the view has gaps: the layer masks by position

    @property
    def seen_tokens(self) -> int:
        return self._seen

    @property
    def num_stored(self) -> int:
        """Entries held in both tiers."""
        return self.sk.shape[1] + len(self.store) + self.rk.shape[1]

    @property
    def num_resident(self) -> int:
        """Entries whose keys and values are resident (sinks and the recent tail)."""
        return self.sk.shape[1] + self.rk.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.sk.dtype

    @property
    def device(self) -> torch.device:
        return self.sk.device

    @property
    def store_start(self) -> int:
        """Position of the store's first entry."""
        return self._seen - self.rk.shape[1] - len(self.store)

    def _sink_positions(self) -> Tensor:
        hi = min(self.n_sinks, self._seen)
        return torch.arange(hi - self.sk.shape[1], hi, device=self.device)

    def _tail_positions(self) -> Tensor:
        return torch.arange(self._seen - self.rk.shape[1], self._seen, device=self.device)

    def _expand(self, pos: Tensor) -> Tensor:
        return pos[None, :, None].expand(self.batch_size, pos.numel(), self.n_heads)

    def kept_positions(self) -> Tensor:
        """``[B, S, H]``: every held position (sinks, store, tail), S = ``num_stored``."""
        lo = self.store_start
        store = torch.arange(lo, lo + len(self.store), device=self.device)
        return self._expand(torch.cat((self._sink_positions(), store, self._tail_positions())))

    def resident_positions(self) -> Tensor:
        """``[B, S_r, H]``: the positions whose keys and values are resident (sinks, then the tail)."""
        return self._expand(torch.cat((self._sink_positions(), self._tail_positions())))

    @property
    def index_nbytes(self) -> int:
        """Resident bytes that are not keys / values: unit vectors and bookkeeping."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._EXTRA))

    def tier_nbytes(self) -> dict[str, int]:
        """``{"resident": ..., "offloaded": ...}``, summing to ``nbytes``."""
        off = self.store.nbytes
        return {"resident": self.nbytes - off, "offloaded": off}

    # -- one call ----------------------------------------------------------------------------------------------------
    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        view = self.update_view(k_new, v_new)
        return view.keys, view.values

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        if q is None:
            raise ValueError(f"{type(self).__name__} retrieves by the queries: update_view needs q")
        if q.ndim != 4 or q.shape[0] != self.batch_size or q.shape[1] != k_new.shape[1] or \
                q.shape[2] % self.n_heads or q.shape[3] != self.head_dim:
            raise ValueError(f"q must be [B, T, Hq, D] with Hq a multiple of {self.n_heads}, got {tuple(q.shape)}")
        b, t, h, _ = k_new.shape
        start, seen = self._seen, self._seen + t
        dev = k_new.device
        self._before(q, start, seen)
        sel = self._select(q, start, seen) if len(self.store) else None
        ks, vs, ps = [self.sk], [self.sv], [self._expand(self._sink_positions())]
        n_ret = 0
        if sel is not None:
            idx, valid = sel
            rk, rv = self.store.gather(idx, valid, dev)
            rp = idx.to(dev) + self.store_start
            if valid is not None:
                rp = rp.masked_fill(~valid.to(dev), _HIDDEN)
            ks.append(rk)
            vs.append(rv)
            ps.append(rp)
            n_ret = idx.shape[1]
        ks += [self.rk, k_new]
        vs += [self.rv, v_new]
        ps += [self._expand(self._tail_positions()), self._expand(torch.arange(start, seen, device=dev))]
        keys, values, pos = torch.cat(ks, dim=1), torch.cat(vs, dim=1), torch.cat(ps, dim=1)
        self._after_attention(q, keys, pos, start, seen, n_ret)
        n_new_sinks = min(max(self.n_sinks - start, 0), t)
        self.sk = torch.cat((self.sk, k_new[:, :n_new_sinks]), dim=1)
        self.sv = torch.cat((self.sv, v_new[:, :n_new_sinks]), dim=1)
        self.rk = torch.cat((self.rk, k_new[:, n_new_sinks:]), dim=1)
        self.rv = torch.cat((self.rv, v_new[:, n_new_sinks:]), dim=1)
        self._seen = seen
        n_move = self._n_offload()
        if n_move:
            self._offload(n_move)
            self.store = self.store.appended(self.rk[:, :n_move], self.rv[:, :n_move])
            self.rk, self.rv = self.rk[:, n_move:].clone(), self.rv[:, n_move:].clone()
        if self.layer_window is not None:
            self._drop_dead(seen - self.layer_window + 1)
        return KVView(keys, values, pos)

    def _drop_dead(self, first_visible: int) -> None:
        """On a sliding-window layer: drop the sinks the window has passed, and the store's dead front
        (``_store_dead`` entries)."""
        hi = min(self.n_sinks, self._seen)
        n_dead = min(max(first_visible - (hi - self.sk.shape[1]), 0), self.sk.shape[1])
        if n_dead:
            self.sk, self.sv = self.sk[:, n_dead:].clone(), self.sv[:, n_dead:].clone()
        n = self._store_dead(first_visible)
        if n:
            self.store = self.store.without_front(n)

    # -- the policy's parts ------------------------------------------------------------------------------------------
    def _before(self, q: Tensor, start: int, seen: int) -> None:
        """Anything the call needs before selecting (SentenceKV: segment the call's tokens)."""

    def _select(self, q: Tensor, start: int, seen: int) -> tuple[Tensor, Tensor | None] | None:
        """Store indices ``[B, K, H]`` to retrieve for the call (and which are valid, or None: all), or None."""
        raise NotImplementedError

    def _after_attention(self, q: Tensor, keys: Tensor, pos: Tensor, start: int, seen: int, n_ret: int) -> None:
        """Score the call (the view is ``[sinks, n_ret retrieved, tail, new]``) before the new tokens are stored."""

    def _n_offload(self) -> int:
        """How many of the tail's oldest tokens move to the store now."""
        raise NotImplementedError

    def _offload(self, n: int) -> None:
        """Build the units' resident vectors for the tail's first ``n`` tokens (which then move to the store)."""
        raise NotImplementedError

    def _store_dead(self, first_visible: int) -> int:
        """How many of the store's first entries to drop on a sliding-window layer (and drop their index)."""
        raise NotImplementedError

    # -- housekeeping ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (keeps batch size, heads, dtype and devices)."""
        self._reset_tensors()
        self._seen = 0

    def _reset_tensors(self) -> None:
        for n in ("sk", "sv", "rk", "rv") + self._EXTRA:
            t = getattr(self, n)
            setattr(self, n, t[:, :0].clone() if t.ndim > 1 and n not in self._PER_ROW else torch.zeros_like(t))
        self.store = OffloadStore(self.store.k[:, :0].clone(), self.store.v[:, :0].clone(), self.store.trace)

    _PER_ROW: tuple[str, ...] = ()  # extras that are per row (not per token / unit): reset to zeros, not emptied

    def to(self, device=None, dtype=None):
        """Move the resident tensors to ``device`` and cast keys / values / unit vectors to ``dtype`` (the store
        stays on its device; float32 scores stay float32); returns self."""
        old = self.dtype
        for n in ("sk", "sv", "rk", "rv") + self._EXTRA:
            t = getattr(self, n)
            setattr(self, n, t.to(device=device, dtype=dtype if t.dtype == old else None))
        self.store = OffloadStore(self.store.k.to(dtype=dtype), self.store.v.to(dtype=dtype), self.store.trace)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        out = {n: getattr(self, n) for n in ("sk", "sv", "rk", "rv") + self._EXTRA}
        out["store.k"], out["store.v"] = self.store.k, self.store.v
        out["seen_tokens"] = torch.tensor(self._seen, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = {"sk", "sv", "rk", "rv", "store.k", "store.v", "seen_tokens"} | set(self._EXTRA)
        if set(state) != want:
            raise ValueError(f"state must have keys {sorted(want)}, got {sorted(state)}")
        shape = (self.batch_size, self.n_heads, self.head_dim)
        for n in ("sk", "sv", "rk", "rv", "store.k", "store.v"):
            t = state[n]
            if t.ndim != 4 or (t.shape[0], t.shape[2], t.shape[3]) != shape:
                raise ValueError(f"state[{n!r}] must be [B={shape[0]}, S, H={shape[1]}, D={shape[2]}], got "
                                 f"{tuple(t.shape)}")
        for a, c in (("sk", "sv"), ("rk", "rv"), ("store.k", "store.v")):
            if state[a].shape != state[c].shape:
                raise ValueError(f"state[{a!r}] and state[{c!r}] hold different shapes")
        for n in self._EXTRA:
            t, cur = state[n], getattr(self, n)
            if t.ndim != cur.ndim or t.shape[0] != self.batch_size or (cur.ndim > 2 and t.shape[2:] != cur.shape[2:]):
                raise ValueError(f"state[{n!r}] must be batch-first like {tuple(cur.shape)}, got {tuple(t.shape)}")
        seen = int(state["seen_tokens"])
        if seen < state["sk"].shape[1] + state["rk"].shape[1] + state["store.k"].shape[1]:
            raise ValueError(f"state['seen_tokens'] ({seen}) is below the entries held")
        for n in ("sk", "sv", "rk", "rv") + self._EXTRA:
            cur = getattr(self, n)
            setattr(self, n, state[n].to(device=self.device, dtype=cur.dtype).clone())
        off = self.store.k.device
        self.store = OffloadStore(state["store.k"].to(device=off, dtype=self.dtype).clone(),
                                  state["store.v"].to(device=off, dtype=self.dtype).clone(), self.store.trace)
        self._seen = seen

    def __repr__(self) -> str:
        t = self.tier_nbytes()
        return (f"{type(self).__name__}(seen_tokens={self._seen}, resident={self.num_resident}, "
                f"offloaded={len(self.store)}, resident_bytes={t['resident']}, offloaded_bytes={t['offloaded']})")


def _group_sum(q: Tensor, n_kv: int) -> Tensor:
    """``[B, T, Hq, D]`` -> ``[B, T, Hkv, D]``: each key/value head's query heads summed (head h reads h // g)."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, n_kv, hq // n_kv, d).sum(dim=3)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# InfLLM


class InfLLM(Policy):
    """InfLLM (Xiao et al. 2024, arXiv 2402.04617; thunlp/InfLLM ``context_manager.py``): context memory in blocks.

    The first ``n_init`` tokens are attention sinks; the most recent tokens stay resident (the local window of
    ``n_local`` plus a remainder shorter than a block); older tokens are cut into blocks of ``block_size`` and
    offloaded, each with a resident representative key: per key/value head, the mean of the ``repr_topk`` keys that
    received the most attention while resident. Each call retrieves the ``topk`` blocks whose representative scores
    highest against the call's mean query (summed over query heads: one set per row, as the reference's ``perhead:
    false``; ``per_head=True``: one set per key/value head) and attends to sinks + retrieved blocks + resident + its
    own tokens in one softmax.

    Args:
        block_size: tokens per block (128). n_init: sinks (128). n_local: local window (4096). topk: blocks
            retrieved per call (16). repr_topk: keys averaged into a representative (4; at most ``block_size``).
        per_head: choose blocks per key/value head instead of per row (default False, the reference's).
        offload_device: where the store lives (None: the cache's device; ``"cpu"``: host memory).
    """

    needs_queries = True

    def __init__(self, block_size: int = 128, *, n_init: int = 128, n_local: int = 4096, topk: int = 16,
                 repr_topk: int = 4, per_head: bool = False, offload_device: str | None = None) -> None:
        self.block_size = check_int("block_size", block_size, 1)
        self.n_init = check_int("n_init", n_init, 0)
        self.n_local = check_int("n_local", n_local, 0)
        self.topk = check_int("topk", topk, 1)
        self.repr_topk = check_int("repr_topk", repr_topk, 1)
        if repr_topk > block_size:
            raise ValueError(f"repr_topk ({repr_topk}) must be <= block_size ({block_size})")
        if not isinstance(per_head, bool):
            raise ValueError(f"per_head must be a bool, got {per_head!r}")
        self.per_head = per_head
        self.offload_device = _check_offload_device(offload_device)

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        return InfLLMCache(self, batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype)


class InfLLMCache(_TieredKVCache):
    """InfLLM's cache. Resident: sinks, tail (``rk``/``rv``) with the attention each tail token received
    (``mass`` ``[B, nr, H]`` float32), the blocks' representatives ``rep`` ``[B, NB, H, D]``. Offloaded: the blocks'
    keys and values, block j at store indices ``[j * block_size, (j + 1) * block_size)``."""

    _EXTRA = ("mass", "rep")

    def __init__(self, policy: InfLLM, batch_size: int, n_heads: int, head_dim: int, *, window=None, device=None,
                 dtype=None) -> None:
        super().__init__(policy.n_init, batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype,
                         offload_device=policy.offload_device)
        self.policy = policy
        self.mass = torch.empty(batch_size, 0, n_heads, device=self.device, dtype=torch.float32)
        self.rep = self.sk.new_empty(batch_size, 0, n_heads, head_dim)
        self.selections: list | None = None  # set to [] to record each call's chosen blocks ([B][H] lists)

    @property
    def num_blocks(self) -> int:
        return self.rep.shape[1]

    def block_scores(self, q: Tensor) -> Tensor:
        """``[B, NB, H]``: each block's score for the call's queries ``q`` ``[B, T, Hq, D]``: the mean query of each
        query head dotted with its key/value head's representative, summed over the group (and over all heads
        unless ``per_head``)."""
        ct = _compute_dtype(self.dtype)
        qbar = _group_sum(q, self.n_heads).to(ct).mean(dim=1)  # [B, Hkv, D]
        s = torch.einsum("bnhd,bhd->bnh", self.rep.to(ct), qbar)  # [B, NB, Hkv]
        if not self.policy.per_head:
            s = s.sum(dim=2, keepdim=True).expand_as(s)
        return s

    def _select(self, q, start, seen):
        nb, bs = self.num_blocks, self.policy.block_size
        if nb == 0:
            return None
        k = min(self.policy.topk, nb)
        blocks = self.block_scores(q).topk(k, dim=1).indices.sort(dim=1).values  # [B, k, H]
        if self.selections is not None:
            self.selections.append(blocks.permute(0, 2, 1).tolist())
        off = torch.arange(bs, device=blocks.device)
        idx = (blocks[:, :, None, :] * bs + off[None, None, :, None]).reshape(self.batch_size, k * bs, self.n_heads)
        return idx, None

    def _after_attention(self, q, keys, pos, start, seen, n_ret):
        q_pos = torch.arange(start, seen, device=q.device)
        got = 0
        for a in range(0, q.shape[1], _SCORE_CHUNK):  # in query chunks: a long prompt never builds [T, S] at once
            probs = attention_probs(q[:, a : a + _SCORE_CHUNK], keys, q_pos[a : a + _SCORE_CHUNK], pos,
                                    self.layer_window)  # [B, Hkv, g, c, S]
            got = got + probs.sum(dim=(2, 3))  # [B, Hkv, S]
        got = got.permute(0, 2, 1)  # [B, S, Hkv]: attention received, summed over the group's heads and the queries
        ns, nr, t = self.sk.shape[1], self.rk.shape[1], q.shape[1]
        n_new_sinks = min(max(self.n_sinks - start, 0), t)
        tail = got[:, ns + n_ret : ns + n_ret + nr]
        new = got[:, keys.shape[1] - t + n_new_sinks :]
        self.mass = torch.cat((self.mass + tail, new), dim=1)

    def _n_offload(self) -> int:
        over = self.rk.shape[1] - self.policy.n_local
        bs = self.policy.block_size
        return (over // bs) * bs if over >= bs else 0

    def _offload(self, n: int) -> None:
        bs, b, h, d = self.policy.block_size, self.batch_size, self.n_heads, self.head_dim
        nb = n // bs
        blk = self.rk[:, :n].reshape(b, nb, bs, h, d)
        m = self.mass[:, :n].reshape(b, nb, bs, h)
        top = m.topk(self.policy.repr_topk, dim=2).indices  # [B, nb, r, H]: the most attended keys of each block
        rep = blk.gather(2, top[..., None].expand(*top.shape, d)).mean(dim=2)  # [B, nb, H, D]
        self.rep = torch.cat((self.rep, rep), dim=1)
        self.mass = self.mass[:, n:].clone()

    def _store_dead(self, first_visible: int) -> int:
        bs = self.policy.block_size
        nd = min(max(first_visible - self.store_start, 0) // bs, self.num_blocks)  # whole blocks the window passed
        if nd:
            self.rep = self.rep[:, nd:].clone()
        return nd * bs


# ----------------------------------------------------------------------------------------------------------------------
# SentenceKV


class SentenceKV(Policy):
    """SentenceKV (Zhu et al. 2025, arXiv 2504.00970; zzbright1998/SentenceKV): sentence-level semantic retrieval.

    Sentences: the tokens from position ``sinks`` on are cut into sentences, each ending after a token of
    ``boundary_ids`` or after ``max_len`` tokens (whichever comes first). Tokens older than the ``recent`` most
    recent move to the store; each sentence keeps a resident semantic vector, the mean of its offloaded keys per
    key/value head. Each call scores the sentences with the mean of the current sentence's queries so far (the
    buffer, summed over each group's query heads) and retrieves, per row and key/value head, the best sentences in
    order (at most ``topk`` of them, None: no limit) until ``max_tokens`` tokens (None: no limit), the last one cut;
    when the buffer holds ``threshold`` queries or fewer, it retrieves nothing (sinks + recent only).

    Token ids reach the caches through a forward pre-hook on the model (``install_token_id_hook``, installed when the
    policy is applied with ``apply_kv_policy`` / ``with policy(model)``; on a Hugging Face model ``mnemos.kv.hf``'s
    model hook, for every policy with ``needs_token_ids``), or ``cache.set_token_ids(ids)`` before a direct
    ``update_view``.

    Args:
        sinks: s0 (32). recent: r (32). topk: sentences per call (None). max_tokens: M, retrieved tokens per call
            (960 = the reference's C 1024 - s0 - r). boundary_ids: sentence-ending ids (default ``.``, ``!``, ``?``,
            ``\\n`` of mnemos' byte tokenizer; give your vocabulary's ids for another tokenizer, ``()``: length only;
            in a spec ``boundary_ids=13;30``, or ``boundary_ids=;`` for none).
        max_len: a sentence's most tokens (100). threshold: the buffer length at or below which nothing is retrieved
            (1, the reference's ``length_threshold``). offload_device: as ``InfLLM``.
    """

    needs_queries = True
    needs_token_ids = True  # mnemos.kv.hf hands each call's input_ids to the caches

    def __init__(self, *, sinks: int = 32, recent: int = 32, topk: int | None = None, max_tokens: int | None = 960,
                 boundary_ids: tuple[int, ...] | int = BYTE_BOUNDARY_IDS, max_len: int = 100, threshold: int = 1,
                 offload_device: str | None = None) -> None:
        self.sinks = check_int("sinks", sinks, 0)
        self.recent = check_int("recent", recent, 0)
        self.topk = None if topk is None else check_int("topk", topk, 1)
        self.max_tokens = None if max_tokens is None else check_int("max_tokens", max_tokens, 1)
        if isinstance(boundary_ids, int) and not isinstance(boundary_ids, bool):
            boundary_ids = (boundary_ids,)
        if boundary_ids == "":  # the spec ``boundary_ids=`` (or ``boundary_ids=;``): sentences by length only
            boundary_ids = ()
        if not isinstance(boundary_ids, (tuple, list)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in boundary_ids):
            raise ValueError(f"boundary_ids must be a tuple of non-negative token ids, got {boundary_ids!r}")
        self.boundary_ids = tuple(boundary_ids)
        self.max_len = check_int("max_len", max_len, 1)
        self.threshold = check_int("threshold", threshold, 0)
        self.offload_device = _check_offload_device(offload_device)

    def prepare(self, model: nn.Module) -> None:
        install_token_id_hook(model)

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        return SentenceKVCache(self, batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype)


class SentenceKVCache(_TieredKVCache):
    """SentenceKV's cache. Resident: sinks, tail (``rk``/``rv``) with each tail token's sentence start ``rstart``
    ``[B, nr]``; per sentence with offloaded tokens its mean key ``rep`` ``[B, NS, H, D]``, start ``sstart``
    ``[B, NS]`` and offloaded token count ``scount`` ``[B, NS]`` (0: a padding slot; rows hold different numbers);
    per row the open sentence's start ``open_start`` ``[B]`` and its queries' group sums ``qsum`` ``[B, H, D]``.
    Offloaded: the tokens' keys and values, position order."""

    _EXTRA = ("rstart", "rep", "sstart", "scount", "open_start", "qsum")
    _PER_ROW = ("open_start", "qsum")

    def __init__(self, policy: SentenceKV, batch_size: int, n_heads: int, head_dim: int, *, window=None,
                 device=None, dtype=None) -> None:
        super().__init__(policy.sinks, batch_size, n_heads, head_dim, window=window, device=device, dtype=dtype,
                         offload_device=policy.offload_device)
        self.policy = policy
        b, dev = batch_size, self.device
        self.rstart = torch.empty(b, 0, dtype=torch.int64, device=dev)
        self.rep = self.sk.new_empty(b, 0, n_heads, head_dim)
        self.sstart = torch.empty(b, 0, dtype=torch.int64, device=dev)
        self.scount = torch.empty(b, 0, dtype=torch.int64, device=dev)
        self.open_start = torch.zeros(b, dtype=torch.int64, device=dev)
        self.qsum = torch.zeros(b, n_heads, head_dim, device=dev, dtype=_compute_dtype(self.dtype))  # >= float32
        self._ids: Tensor | None = None
        self._call_starts = self._qbuf = self._nbuf = None  # set during a call only
        self.selections: list | None = None  # set to [] to record each call's chosen sentence starts ([B][H] lists)

    def set_token_ids(self, ids: Tensor) -> None:
        """The token ids ``[B, T]`` of the model's next call (the model's hook sets them). The cache's updates consume
        them in order: one ``update_view`` of all T tokens, or several of fewer (MAC's segment pieces, which also
        reset the cache at a segment boundary in the middle of the call: pending ids survive ``reset``)."""
        self._ids = ids

    def _before(self, q, start, seen):
        ids = self._ids
        t = seen - start
        if ids is None:
            raise ValueError("SentenceKV needs the token ids of every call: apply the policy to the model "
                             "(apply_kv_policy / with policy(model), which installs the id hook) or call "
                             "cache.set_token_ids(ids) before update_view")
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[0] != self.batch_size or ids.shape[1] < t:
            raise ValueError(f"token ids must be [B={self.batch_size}, T>={t}] (this update's {t} tokens first), got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        ids, self._ids = ids[:, :t], (ids[:, t:] if ids.shape[1] > t else None)
        bound, max_len, s0 = set(self.policy.boundary_ids), self.policy.max_len, self.n_sinks
        starts, opens = [], []
        for row, o in zip(ids.tolist(), self.open_start.tolist(), strict=True):
            st = []
            for i, tok in enumerate(row):
                p = start + i
                if p < s0:  # a sink: in no sentence
                    st.append(-1)
                    o = p + 1
                    continue
                st.append(o)
                if tok in bound or p - o + 1 >= max_len:
                    o = p + 1
            starts.append(st)
            opens.append(o)
        self._call_starts = torch.tensor(starts, dtype=torch.int64, device=self.device).reshape(self.batch_size, t)
        # the buffer: the queries of the last token's sentence, this call's and the earlier ones'
        last = self._call_starts[:, -1]  # [B]; -1: the call ends in the sinks
        qg = _group_sum(q, self.n_heads).to(self.qsum.dtype)  # [B, T, Hkv, D]
        q_pos = torch.arange(start, seen, device=self.device)
        in_buf = (q_pos[None, :] >= last[:, None]) & (last[:, None] >= 0)  # [B, T]
        carried = (last < start) & (last >= 0)
        self._qbuf = torch.where(carried[:, None, None], self.qsum, torch.zeros_like(self.qsum)) + \
            (qg * in_buf[:, :, None, None].to(qg.dtype)).sum(dim=1)  # [B, Hkv, D]
        self._nbuf = torch.where(last >= 0, seen - last, torch.zeros_like(last))  # [B]
        new_open = torch.tensor(opens, dtype=torch.int64, device=self.device)
        closed = new_open == seen
        self.qsum = torch.where(closed[:, None, None], torch.zeros_like(self._qbuf), self._qbuf)
        self.open_start = new_open

    def sentence_scores(self) -> Tensor:
        """``[B, NS, H]`` the call's sentence scores (``-inf``: a padding slot, or a row whose buffer is at or
        below the threshold)."""
        ct = _compute_dtype(self.dtype)
        qbar = self._qbuf.to(ct) / self._nbuf.clamp(min=1).to(ct)[:, None, None]  # [B, Hkv, D]
        s = torch.einsum("bjhd,bhd->bjh", self.rep.to(ct), qbar)
        ok = (self.scount > 0)[:, :, None] & (self._nbuf > self.policy.threshold)[:, None, None]
        return s.masked_fill(~ok, float("-inf"))

    def _select(self, q, start, seen):
        ns = self.rep.shape[1]
        if ns == 0:
            return None
        b, h, n = self.batch_size, self.n_heads, len(self.store)
        scores = self.sentence_scores()  # [B, NS, H]
        order = scores.argsort(dim=1, descending=True, stable=True)
        s_sorted = scores.gather(1, order)
        cnt_sorted = self.scount[:, :, None].expand(b, ns, h).gather(1, order)
        chosen_sorted = torch.isfinite(s_sorted)
        if self.policy.topk is not None:
            chosen_sorted &= torch.arange(ns, device=self.device)[None, :, None] < self.policy.topk
        cnt_sorted = torch.where(chosen_sorted, cnt_sorted, torch.zeros_like(cnt_sorted))
        before_sorted = cnt_sorted.cumsum(dim=1) - cnt_sorted
        chosen = torch.zeros_like(chosen_sorted).scatter(1, order, chosen_sorted)  # [B, NS, H]
        before = torch.zeros_like(before_sorted).scatter(1, order, before_sorted)
        lo = self.store_start
        p = torch.arange(lo, lo + n, device=self.device)  # [N] store positions
        sid = (torch.searchsorted(self.sstart, p[None, :].expand(b, n).contiguous(), right=True) - 1).clamp(min=0)
        first = self.sstart.clamp(min=lo).gather(1, sid)  # [B, N]: the sentence's first stored position
        take = chosen.gather(1, sid[:, :, None].expand(b, n, h))  # [B, N, H]
        if self.policy.max_tokens is not None:
            offset = (p[None, :] - first)[:, :, None]
            take &= before.gather(1, sid[:, :, None].expand(b, n, h)) + offset < self.policy.max_tokens
        if self.selections is not None:
            self.selections.append([[sorted({int(self.sstart[r, j]) for j in range(ns) if chosen[r, j, hh]})
                                     for hh in range(h)] for r in range(b)])
        per = take.sum(dim=1)  # [B, H]
        k = int(per.max())
        if k == 0:
            return None
        idx = take.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :k]  # [B, k, H], position order
        valid = torch.arange(k, device=self.device)[None, :, None] < per[:, None, :]
        return idx, valid

    def _after_attention(self, q, keys, pos, start, seen, n_ret):
        t = seen - start
        n_new_sinks = min(max(self.n_sinks - start, 0), t)
        self.rstart = torch.cat((self.rstart, self._call_starts[:, n_new_sinks:]), dim=1)
        self._call_starts = self._qbuf = self._nbuf = None  # the call's temporaries: the cache holds no more

    def _n_offload(self) -> int:
        return max(self.rk.shape[1] - self.policy.recent, 0)

    def _offload(self, n: int) -> None:
        """Fold the tail's first ``n`` tokens into their sentences' mean keys (a running mean over offloaded
        tokens), appending new sentences; rows are padded to the longest."""
        reps, starts, counts = [], [], []
        for r in range(self.batch_size):
            st = self.rstart[r, :n]
            uniq, cnt = torch.unique_consecutive(st, return_counts=True)
            gid = torch.repeat_interleave(torch.arange(uniq.numel(), device=self.device), cnt)
            sums = self.rk.new_zeros(uniq.numel(), self.n_heads, self.head_dim).index_add_(0, gid, self.rk[r, :n])
            nv = int((self.scount[r] > 0).sum())
            rep, ss, sc = self.rep[r, :nv], self.sstart[r, :nv], self.scount[r, :nv]
            if nv and int(ss[-1]) == int(uniq[0]):  # the first tokens continue the last offloaded sentence
                c = sc[-1].to(rep.dtype)
                merged = (rep[-1] * c + sums[0]) / (c + cnt[0].to(rep.dtype))
                rep = torch.cat((rep[:-1], merged[None]))
                sc = torch.cat((sc[:-1], sc[-1:] + cnt[0]))
                uniq, cnt, sums = uniq[1:], cnt[1:], sums[1:]
            reps.append(torch.cat((rep, sums / cnt[:, None, None].to(sums.dtype))))
            starts.append(torch.cat((ss, uniq)))
            counts.append(torch.cat((sc, cnt)))
        self._set_sentences(reps, starts, counts)
        self.rstart = self.rstart[:, n:].clone()

    def _set_sentences(self, reps: list[Tensor], starts: list[Tensor], counts: list[Tensor]) -> None:
        m = max(x.shape[0] for x in starts)
        b = self.batch_size
        self.rep = self.rk.new_zeros(b, m, self.n_heads, self.head_dim)
        self.sstart = torch.full((b, m), _HIDDEN, dtype=torch.int64, device=self.device)
        self.scount = torch.zeros(b, m, dtype=torch.int64, device=self.device)
        for r in range(b):
            k = starts[r].shape[0]
            self.rep[r, :k], self.sstart[r, :k], self.scount[r, :k] = reps[r], starts[r], counts[r]

    def _store_dead(self, first_visible: int) -> int:
        lo = self.store_start
        nd = min(max(first_visible - lo, 0), len(self.store))
        if nd:
            a = self.sstart.clamp(min=lo)
            end = a + self.scount
            cnt = (end - a.clamp(min=lo + nd)).clamp(min=0) * (self.scount > 0)
            keep = cnt > 0
            self._set_sentences([self.rep[r][keep[r]] for r in range(self.batch_size)],
                                [self.sstart[r][keep[r]] for r in range(self.batch_size)],
                                [cnt[r][keep[r]] for r in range(self.batch_size)])
        return nd


# ----------------------------------------------------------------------------------------------------------------------
# token ids for SentenceKV


def _sentence_caches(obj: Any) -> list[SentenceKVCache]:
    found, seen, stack = [], set(), [obj]
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (bool, int, float, str, bytes, Tensor, nn.Module)) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, SentenceKVCache):
            found.append(o)
        elif isinstance(o, KVCache):
            continue
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        else:
            stack.extend(getattr(o, "__dict__", {}).values())
    return found


def _token_id_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    ids = args[0] if args else kwargs.get("input_ids")
    cache = args[1] if len(args) > 1 else kwargs.get("cache")
    if not isinstance(ids, Tensor) or cache is None:
        return
    for c in _sentence_caches(cache):
        c.set_token_ids(ids)


def install_token_id_hook(model: nn.Module) -> None:
    """A forward pre-hook on ``model`` (a ``MnemosLM``: ``forward(input_ids, cache)``) handing each call's token
    ids to the ``SentenceKVCache`` objects in its cache (once per model; it does nothing for other caches)."""
    if getattr(model, _IDS_HOOK, None) is None:
        setattr(model, _IDS_HOOK, model.register_forward_pre_hook(_token_id_hook, with_kwargs=True))
