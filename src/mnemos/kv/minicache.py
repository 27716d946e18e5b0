"""MiniCache: cross-layer merge of the KV caches of adjacent deep layers (Liu et al. 2024, arXiv 2405.14366, NeurIPS
2024; sec. 4).

The algorithm, per pair of adjacent attention layers (l, l + 1) from ``start`` on (default ``n_layers // 2``: the
paper merges from the middle of the network down), for keys and values separately, per token, batch row and
key/value head (post-RoPE keys; positions are untouched):

- directions ``e = x / ||x||`` of the two layers' vectors, angle ``Omega`` between them, angular distance
  ``d = Omega / pi`` in [0, 1];
- the shared direction is their SLERP, ``e = sin((1 - t) Omega) / sin(Omega) e_l + sin(t Omega) / sin(Omega) e_l+1``
  (computed in the equivalent, better conditioned rotation form ``cos(t Omega) e_l + sin(t Omega) w`` with w the unit
  component of ``e_l+1`` orthogonal to ``e_l``; ``slerp``), and each layer keeps its own norm: what is stored for a
  merged token is one direction vector for the pair and two scalars;
- **retention** (the paper's rule): a token whose two vectors are too far apart, ``d > d_min + (d_max - d_min)
  gamma`` (gamma = 0.05), is retained unmerged in both layers and restored bit-exact. Layout: the paper stores the
  two layers' retained vectors beside the merged cache; here the lower layer's vector takes the token's own slot in
  the merged cache (with a scale of 1) and only the upper's is stored beside it, with an int64 index, so a retained
  token costs one extra vector, not two. ``d_min`` / ``d_max`` are per batch row and key/value head, over every
  token the pair has merged so far (a running min / max, so that a streamed prefill and decoding apply the same rule
  call after call; for a prompt in one call it is exactly the paper's per-prompt rule). KVCache-Factory's
  ``minicache.py`` instead retains the top 5 % by d: a quota that needs the whole prompt at once (per call it would
  retain every decoding token, ``ceil(0.05 * 1) = 1``), so it is not used;
- restore for attention: ``x^ = e ||x||``, then the retained tokens scattered back.

Cross-layer coordination, inside the existing contract (no change to ``KVCache`` / ``KVPolicy``): within one
forward call layer l's cache is called before layer l + 1's, and only then are both layers' keys of the call's tokens
known. So:

- the pair's **lower** cache (``MiniCacheLower``) owns what the pair shares: the directions ``[B, S, H, D]``, the
  retained tokens' indices, the running d_min / d_max, plus its own norms. A call restores its stored tokens,
  appends the new ones to a pending full-precision buffer and posts itself in the policy's mailbox (a FIFO per pair
  on the policy object, which both caches share and which ``copy.copy`` keeps);
- the pair's **upper** cache (``MiniCacheUpper``) owns its norms and retained vectors. Its call takes the lower
  cache from the mailbox, restores its own stored tokens with the lower's directions, then merges its new tokens with
  the lower's pending ones (the lower's storage and its own grow by the merged tokens; the pending buffer empties).

Between forward calls each cache is self-contained (batch-first tensors in its ``state_dict``; the mailbox is empty),
so ``Cache.select`` / ``reorder`` / ``detach`` / ``to`` / ``state_dict`` of mnemos and the Hugging Face hook's
per-layer rebuild (beam search) work unchanged; the link between the two caches exists only while a forward call
runs. The pair's caches must be called in layer order with the same tokens (any model forward does this); an upper
cache called without its lower raises. (A store object shared by the two caches would break there: those operations
shallow-copy each cache on its own and rebind its tensors, so a copy would share, and write into, the original's
store.) Like KIVI, the tokens of a call are attended at full precision by that call's
queries; later calls see the merged form.

Bytes, per batch row, merged pair, keys or values, S stored tokens, H key/value heads, D head dim, e the element
size, n the norms' element size (float32, or float64 for a float64 cache), R the retained (token, head) entries of
the batch's widest row (narrower rows are padded with index -1): ``S H (D e + 2 n) + R (D e + 8) + 8 H`` (the 8 H:
float32 d_min / d_max per head) against ``2 S H D e`` for the two full caches. With nothing retained the pair saves
``S H (D e - 2 n) - 8 H``, about (D - 4) / (2 D) of it in fp16 (48 % at D = 128); every token retained costs
``S H (2 n + 8) + 8 H`` more than the full caches.
"""

from __future__ import annotations

import copy
import math
from collections import deque

import torch
from torch import Tensor

from mnemos.kv.base import Policy, _check_new, attention_layers, check_int, check_ratio, default_cache
from mnemos.layers.kv_cache import KVCache, KVView

__all__ = ["MiniCache", "MiniCacheLower", "MiniCacheUpper", "slerp", "merge_pair", "angular_distance"]

_KINDS = ("k", "v")


# ----------------------------------------------------------------------------------------------------------------------
# the math


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms are stored in float32 (float64 for a float64 cache): a half-precision norm of a large key can overflow."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rotation_frame(e0: Tensor, e1: Tensor) -> tuple[Tensor, Tensor]:
    """``(omega, w)``: the angle between unit vectors ``e0`` / ``e1`` (``[..., D]``) and the unit component of e1
    orthogonal to e0 (0 where there is none)."""
    dot = (e0 * e1).sum(dim=-1, keepdim=True)  # [..., 1]
    w = e1 - dot * e0  # [..., D]
    wn = w.norm(dim=-1, keepdim=True)
    omega = torch.atan2(wn, dot)  # [..., 1], in [0, pi]; accurate near 0 and pi (arccos is not)
    # at rounding level (parallel or opposite to machine precision) the orthogonal part is noise: no plane to rotate in
    w = torch.where(wn > 8 * torch.finfo(w.dtype).eps, w / wn.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
    same = (e0 == e1).all(dim=-1, keepdim=True)  # identical directions: angle 0, not rounding noise (|e0|^2 != 1)
    return omega.masked_fill(same, 0.0), w.masked_fill(same, 0.0)


def angular_distance(e0: Tensor, e1: Tensor) -> Tensor:
    """``d = Omega / pi`` in [0, 1] between unit vectors along the last dim: ``[..., D] -> [...]``."""
    return _rotation_frame(e0, e1)[0][..., 0] / math.pi


def slerp(e0: Tensor, e1: Tensor, t: float) -> Tensor:
    """Spherical linear interpolation of unit vectors ``e0`` -> ``e1`` (``[..., D]``) at ``t`` in [0, 1].

    Equals ``sin((1 - t) Omega) / sin(Omega) e0 + sin(t Omega) / sin(Omega) e1`` (MiniCache eq. 2), computed as the
    rotation of e0 by ``t Omega`` towards e1, ``cos(t Omega) e0 + sin(t Omega) w`` with w the unit component of e1
    orthogonal to e0, which stays accurate for nearly parallel and nearly opposite vectors; the result is
    renormalised. Identical directions give e0 exactly; exactly opposite ones (no plane to rotate in) give e0 for
    t <= 0.5 and e1 above.
    """
    return _slerp_in(e0, e1, t, *_rotation_frame(e0, e1))


def _slerp_in(e0: Tensor, e1: Tensor, t: float, omega: Tensor, w: Tensor) -> Tensor:
    out = torch.cos(t * omega) * e0 + torch.sin(t * omega) * w  # [..., D]
    out = out / out.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    same = (e0 == e1).all(dim=-1, keepdim=True)
    return torch.where(same, e0, out)


def merge_pair(x0: Tensor, x1: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MiniCache's merge of two layers' vectors ``[..., D]`` (computed in float32, float64 for float64 inputs).

    Returns ``(direction [..., D], norm0 [...], norm1 [...], d [...])``: the SLERP of their unit directions, each
    layer's norm and the angular distance ``d = Omega / pi``. A zero vector takes the other's direction (both zero:
    a zero direction), so ``direction * norm`` restores it.
    """
    cd = _compute_dtype(x0.dtype)
    a, b = x0.to(cd), x1.to(cd)
    n0, n1 = a.norm(dim=-1), b.norm(dim=-1)  # [...]
    tiny = torch.finfo(cd).tiny
    e0 = a / n0.clamp_min(tiny)[..., None]
    e1 = b / n1.clamp_min(tiny)[..., None]
    z0, z1 = (n0 == 0)[..., None], (n1 == 0)[..., None]
    e0, e1 = torch.where(z0, e1, e0), torch.where(z1, e0, e1)
    omega, w = _rotation_frame(e0, e1)
    return _slerp_in(e0, e1, t, omega, w), n0, n1, omega[..., 0] / math.pi


# ----------------------------------------------------------------------------------------------------------------------
# the policy


class MiniCache(Policy):
    """MiniCache's cross-layer merge of adjacent deep layers (``MiniCacheLower`` / ``MiniCacheUpper``; see the module
    docstring).

    Args:
        start: the first layer of the first merged pair (pairs ``(start, start + 1), (start + 2, start + 3), ...``; a
            last layer left alone keeps the default cache, as do the layers before ``start``). None (default):
            ``n_layers // 2`` (the paper: from the middle of the network), at most ``n_layers - 2``. Must leave a
            pair: ``start <= n_layers - 2``.
        t: the SLERP interpolation parameter in [0, 1] (0: the lower layer's direction, 1: the upper's); default 0.6,
            the paper's.
        gamma: the retention threshold in [0, 1]: a token is retained unmerged when ``d > d_min + (d_max - d_min)
            gamma``; default 0.05, the paper's. gamma = 1 retains nothing.
    """

    def __init__(self, start: int | None = None, *, t: float = 0.6, gamma: float = 0.05) -> None:
        self.start = None if start is None else check_int("start", start, 0)
        self.t = check_ratio("t", t, 0.0, 1.0)
        self.gamma = check_ratio("gamma", gamma, 0.0, 1.0)
        self._mailbox: dict[int, deque] = {}  # lower layer index -> lower caches called, waiting for their upper

    # -- the pairs ---------------------------------------------------------------------------------------------------
    def first_layer(self, n_layers: int) -> int:
        """The first merged layer of a model of ``n_layers`` attention layers (ValueError if no pair fits)."""
        self.check_n_layers(n_layers)
        return min(n_layers // 2, n_layers - 2) if self.start is None else self.start

    def check_n_layers(self, n_layers: int) -> None:
        """Raise ValueError unless the model's ``n_layers`` attention layers hold a pair from ``start`` on."""
        if n_layers < 2:
            raise ValueError(f"MiniCache merges pairs of adjacent attention layers; the model has {n_layers}")
        if self.start is not None and self.start > n_layers - 2:
            raise ValueError(f"start ({self.start}) is beyond the model: with {n_layers} attention layers the last "
                             f"pair starts at layer {n_layers - 2}")

    def role(self, layer_idx: int, n_layers: int) -> str | None:
        """``"lower"`` / ``"upper"`` for a merged layer, None for a layer left alone."""
        s = self.first_layer(n_layers)
        if layer_idx < s:
            return None
        k = layer_idx - s
        if k % 2 == 0:
            return "lower" if layer_idx + 1 < n_layers else None
        return "upper"

    def retain_mask(self, d: Tensor, stat: Tensor) -> Tensor:
        """Which of a call's tokens stay unmerged: ``d`` ``[B, T, H]`` float32 their angular distances, ``stat``
        ``[B, H, 2]`` the running (d_min, d_max) of the pair's row and head, this call's tokens included. The paper's
        rule: ``d > d_min + (d_max - d_min) gamma``."""
        lo, hi = stat[..., 0], stat[..., 1]  # [B, H]
        return d > (lo + (hi - lo) * self.gamma)[:, None, :]

    def prepare(self, model) -> None:
        self.check_n_layers(len(attention_layers(model)))

    # -- the mailbox: how the pair's caches meet inside a forward call -----------------------------------------------
    def _post(self, lower_idx: int, cache: "MiniCacheLower", n_tokens: int) -> None:
        self._mailbox.setdefault(lower_idx, deque()).append((cache, n_tokens))

    def _hand_over(self, lower_idx: int, old: "MiniCacheLower", frozen: "MiniCacheLower") -> None:
        """Replace ``old`` by ``frozen`` among the calls waiting for their upper layer (a lower cache reset in the
        middle of a forward call, as MAC does at a segment boundary, leaves its waiting calls to a frozen copy)."""
        box = self._mailbox.get(lower_idx)
        if box:
            self._mailbox[lower_idx] = deque((frozen if c is old else c, n) for c, n in box)

    def _take(self, lower_idx: int) -> tuple["MiniCacheLower", int]:
        box = self._mailbox.get(lower_idx)
        if not box:
            raise RuntimeError(f"MiniCache: layer {lower_idx + 1}'s cache was called without its pair's lower layer "
                               f"{lower_idx} in the same forward call (the pair's caches must run in layer order)")
        cache = box.popleft()
        if not box:
            del self._mailbox[lower_idx]
        return cache

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        role = self.role(layer_idx, n_layers)
        if role is None:
            return default_cache(batch_size, n_heads, head_dim, window, device, dtype)
        cls = MiniCacheLower if role == "lower" else MiniCacheUpper
        lower_idx = layer_idx if role == "lower" else layer_idx - 1
        return cls(self, batch_size, n_heads, head_dim, lower_idx=lower_idx, window=window, device=device,
                   dtype=dtype)

    def __repr__(self) -> str:
        return f"MiniCache(start={self.start!r}, t={self.t!r}, gamma={self.gamma!r})"


# ----------------------------------------------------------------------------------------------------------------------
# the caches


class _PairCache(KVCache):
    """What the two caches of a merged pair share: configuration, checks, the window."""

    def __init__(self, policy: MiniCache, batch_size: int, n_heads: int, head_dim: int, *, lower_idx: int,
                 window: int | None = None, device=None, dtype=None) -> None:
        self.policy = policy
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.head_dim = self.value_dim = check_int("head_dim", head_dim, 1)
        self.lower_idx = lower_idx
        self.layer_window = window
        self._dtype = torch.get_default_dtype() if dtype is None else dtype
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._seen = 0
        self._alloc()

    def _alloc(self) -> None:
        """Allocate the layer's empty stores (a fresh cache; also what a reset does)."""
        raise NotImplementedError

    @property
    def window(self) -> int | None:
        return self.layer_window  # at least the last W - 1 tokens are kept, contiguous

    @property
    def seen_tokens(self) -> int:
        return self._seen

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        view = self.update_view(k_new, v_new)
        return view.keys, view.values

    def kept_positions(self) -> Tensor:
        s = self.num_stored
        pos = torch.arange(self._seen - s, self._seen, device=self.device)  # a contiguous suffix
        return pos[None, :, None].expand(self.batch_size, s, self.n_heads)  # [B, S, H]

    def _empty(self, *shape, dtype=None) -> Tensor:
        return torch.empty(*shape, device=self.device, dtype=self.dtype if dtype is None else dtype)


def _compact(idx: Tensor, *aligned: Tensor) -> tuple[Tensor, ...]:
    """Per row, move the valid entries (``idx >= 0``) of ``idx [B, R]`` and of the tensors ``[B, R, ...]`` aligned
    with it to the front, in order, and cut the width to the row maximum of valid entries."""
    valid = idx >= 0  # [B, R]
    width = int(valid.sum(dim=1).max()) if idx.numel() else 0
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [B, R']
    out = [idx.gather(1, order)]
    for x in aligned:
        out.append(x.gather(1, order.reshape(*order.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])))
    return tuple(out)


class MiniCacheLower(_PairCache):
    """The lower layer of a merged pair: it holds the pair's shared part (see the module docstring).

    Holds, for keys (``k_``) and values (``v_``): ``dir`` ``[B, S, H, D]`` the merged unit directions (cache dtype;
    a retained token's slot holds this layer's own vector), ``norm`` ``[B, S, H]`` this layer's norms (1 for a
    retained token), ``ridx`` ``[B, R]`` int64 the retained tokens (``position * H + head``, -1 pads a row),
    ``stat`` ``[B, H, 2]`` float32 (d_min, d_max so far) and ``pend`` ``[B, P, H, D]`` the tokens waiting for the
    upper layer (empty between calls).
    """

    def _alloc(self) -> None:
        b, h, d = self.batch_size, self.n_heads, self.head_dim
        nd = _norm_dtype(self.dtype)
        self._dir = {k: self._empty(b, 0, h, d) for k in _KINDS}
        self._norm = {k: self._empty(b, 0, h, dtype=nd) for k in _KINDS}
        self._ridx = {k: self._empty(b, 0, dtype=torch.int64) for k in _KINDS}
        stat = torch.tensor([math.inf, -math.inf], device=self.device, dtype=torch.float32)
        self._stat = {k: stat.expand(b, h, 2).clone() for k in _KINDS}
        self._pend = {k: self._empty(b, 0, h, d) for k in _KINDS}

    # -- introspection -----------------------------------------------------------------------------------------------
    @property
    def num_merged(self) -> int:
        """Tokens stored in merged form (all stored tokens once the upper layer has run)."""
        return self._dir["k"].shape[1]

    @property
    def num_stored(self) -> int:
        return self.num_merged + self._pend["k"].shape[1]

    @property
    def first_position(self) -> int:
        """The position of the first merged token held."""
        return self._seen - self.num_stored

    def retained_positions(self, kind: str = "k") -> list[list[tuple[int, int]]]:
        """Per batch row, the ``(position, head)`` of each retained token of keys (``"k"``) or values (``"v"``)."""
        h = self.n_heads
        return [[(int(i) // h, int(i) % h) for i in row if i >= 0] for row in self._ridx[kind]]

    def directions(self, kind: str = "k") -> Tensor:
        """The merged unit directions ``[B, S, H, D]`` of keys or values (a retained token: this layer's vector)."""
        return self._dir[kind]

    def norms(self, kind: str = "k") -> Tensor:
        """This layer's norms ``[B, S, H]`` of keys or values (1 for a retained token)."""
        return self._norm[kind]

    def restore(self, kind: str, norm: Tensor, ret: Tensor | None = None) -> Tensor:
        """A layer's stored tokens, ``[B, S, H, D]`` in the cache dtype: ``direction * norm``, then the retained
        vectors ``ret`` ``[B, R, D]`` scattered back (``norm`` / ``ret``: this layer's, no ``ret``, or the upper's)."""
        dirs = self._dir[kind]
        b, s, h, d = dirs.shape
        x = (dirs.to(norm.dtype) * norm[..., None]).to(self.dtype).reshape(b, s * h, d)  # token-major per row
        idx = self._ridx[kind]
        if ret is not None and idx.shape[1]:
            local = idx - self.first_position * h
            local = torch.where(idx >= 0, local, torch.full_like(local, s * h))  # pads go to a dummy slot
            x = torch.cat((x, x.new_zeros(b, 1, d)), dim=1)
            x = x.scatter(1, local[..., None].expand(-1, -1, d), ret)[:, : s * h]
        return x.reshape(b, s, h, d)

    def restored(self) -> tuple[Tensor, Tensor]:
        """This layer's stored keys and values as attention sees them: ``[B, S, H, D]`` each."""
        k = torch.cat((self.restore("k", self._norm["k"]), self._pend["k"]), dim=1)
        v = torch.cat((self.restore("v", self._norm["v"]), self._pend["v"]), dim=1)
        return k, v

    # -- the policy --------------------------------------------------------------------------------------------------
    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        k_old, v_old = self.restored()
        keys, values = torch.cat((k_old, k_new), dim=1), torch.cat((v_old, v_new), dim=1)
        self._pend = {"k": torch.cat((self._pend["k"], k_new), dim=1), "v": torch.cat((self._pend["v"], v_new), dim=1)}
        self._seen += k_new.shape[1]
        self.policy._post(self.lower_idx, self, k_new.shape[1])
        return KVView(keys, values, None)

    def _absorb(self, upper: "MiniCacheUpper", k_new: Tensor, v_new: Tensor) -> None:
        """Merge the upper layer's new tokens with the oldest pending ones of this layer; both caches grow."""
        t = k_new.shape[1]
        b, h, d = self.batch_size, self.n_heads, self.head_dim
        p0 = self.num_merged + self.first_position  # position of the first token being merged
        for kind, x1 in (("k", k_new), ("v", v_new)):
            x0 = self._pend[kind][:, :t]  # [B, T, H, D]
            direction, n0, n1, dist = merge_pair(x0, x1, self.policy.t)  # [B, T, H, D], [B, T, H] x 3
            st = self._stat[kind]
            st = torch.stack((torch.minimum(st[..., 0], dist.float().amin(dim=1)),
                              torch.maximum(st[..., 1], dist.float().amax(dim=1))), dim=-1)  # [B, H, 2]
            self._stat[kind] = st
            keep = self.policy.retain_mask(dist.float(), st).reshape(b, t * h)  # [B, T*H] token-major
            width = int(keep.sum(dim=1).max())
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [B, W]
            ok = keep.gather(1, order)
            new_idx = torch.where(ok, order + p0 * h, torch.full_like(order, -1))
            ret1 = x1.reshape(b, t * h, d).gather(1, order[..., None].expand(-1, -1, d))  # [B, W, D]
            # a retained token keeps this layer's own vector in its slot, with a scale of 1 (restored bit-exact)
            kept = keep.reshape(b, t, h)
            slot = torch.where(kept[..., None], x0, direction.to(self.dtype))
            nd = self._norm[kind].dtype
            self._dir[kind] = torch.cat((self._dir[kind], slot), dim=1)
            self._norm[kind] = torch.cat((self._norm[kind], n0.to(nd).masked_fill(kept, 1.0)), dim=1)
            upper._norm[kind] = torch.cat((upper._norm[kind], n1.to(nd)), dim=1)
            idx = torch.cat((self._ridx[kind], new_idx), dim=1)
            r1 = torch.cat((upper._ret[kind], ret1), dim=1)
            self._ridx[kind], upper._ret[kind] = _compact(idx, r1)
            self._pend[kind] = self._pend[kind][:, t:].clone()
        if self.layer_window is not None:
            self._trim(upper, self.layer_window - 1)

    def _trim(self, upper: "MiniCacheUpper", keep: int) -> None:
        """Drop the oldest merged tokens a sliding-window layer no longer sees (at least ``keep`` stay)."""
        drop = self.num_stored - keep
        drop = min(drop, self.num_merged)
        if drop <= 0:
            return
        cut = (self.first_position + drop) * self.n_heads  # retained indices below this go
        for kind in _KINDS:
            self._dir[kind] = self._dir[kind][:, drop:].clone()
            self._norm[kind] = self._norm[kind][:, drop:].clone()
            upper._norm[kind] = upper._norm[kind][:, drop:].clone()
            idx = self._ridx[kind]
            idx = torch.where(idx >= cut, idx, torch.full_like(idx, -1))
            self._ridx[kind], upper._ret[kind] = _compact(idx, upper._ret[kind])

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    _FIELDS = ("dir", "norm", "ridx", "stat", "pend")

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"{k}_{f}": getattr(self, f"_{f}")[k] for f in self._FIELDS for k in _KINDS}
        out["seen_tokens"] = torch.tensor(self._seen, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = {f"{k}_{f}" for f in self._FIELDS for k in _KINDS} | {"seen_tokens"}
        if set(state) != want:
            raise ValueError(f"state must have keys {sorted(want)}, got {sorted(state)}")
        b, h, d = self.batch_size, self.n_heads, self.head_dim
        for k in _KINDS:
            s, r, p = state[f"{k}_dir"].shape[1], state[f"{k}_ridx"].shape[1], state[f"{k}_pend"].shape[1]
            shapes = {"dir": (b, s, h, d), "norm": (b, s, h), "ridx": (b, r), "stat": (b, h, 2), "pend": (b, p, h, d)}
            for f, shape in shapes.items():
                if tuple(state[f"{k}_{f}"].shape) != shape:
                    raise ValueError(f"state['{k}_{f}'] must be {shape}, got {tuple(state[f'{k}_{f}'].shape)}")
        if state["k_dir"].shape[1] != state["v_dir"].shape[1] or state["k_pend"].shape[1] != state["v_pend"].shape[1]:
            raise ValueError("state's keys and values hold different numbers of tokens")
        seen = int(state["seen_tokens"])
        if seen < state["k_dir"].shape[1] + state["k_pend"].shape[1]:
            raise ValueError(f"state['seen_tokens'] ({seen}) is below the stored tokens")
        nd = _norm_dtype(self.dtype)
        dtypes = {"dir": self.dtype, "norm": nd, "ridx": torch.int64, "stat": torch.float32, "pend": self.dtype}
        for f, dt in dtypes.items():
            setattr(self, f"_{f}", {k: state[f"{k}_{f}"].to(device=self.device, dtype=dt).clone() for k in _KINDS})
        self._seen = seen

    def reset(self) -> None:
        """Empty the cache. Calls of this cache still waiting for the upper layer (MAC resets its segment cache at a
        segment boundary, in the middle of a forward call, before the next layer runs) go on with a frozen copy of
        the cache as it was, which the upper layer then merges into and reads from."""
        self.policy._hand_over(self.lower_idx, self, copy.copy(self))  # the copy keeps the tensors _alloc replaces
        self._alloc()
        self._seen = 0

    def to(self, device=None, dtype=None) -> "MiniCacheLower":
        self._device = self._device if device is None else torch.device(device)
        self._dtype = self._dtype if dtype is None else dtype
        nd = _norm_dtype(self._dtype)
        for f, dt in (("dir", self._dtype), ("norm", nd), ("ridx", None), ("stat", None), ("pend", self._dtype)):
            setattr(self, f"_{f}", {k: x.to(device=self._device, dtype=dt) for k, x in getattr(self, f"_{f}").items()})
        return self

    def __repr__(self) -> str:
        return (f"MiniCacheLower(layer={self.lower_idx}, seen_tokens={self._seen}, num_stored={self.num_stored}, "
                f"retained=(k {int((self._ridx['k'] >= 0).sum())}, v {int((self._ridx['v'] >= 0).sum())}), "
                f"nbytes={self.nbytes})")


class MiniCacheUpper(_PairCache):
    """The upper layer of a merged pair: its own norms ``k_norm`` / ``v_norm`` ``[B, S, H]`` and retained vectors
    ``k_ret`` / ``v_ret`` ``[B, R, D]`` (aligned with the lower cache's indices); the directions are the lower's."""

    def _alloc(self) -> None:
        b, h, d = self.batch_size, self.n_heads, self.head_dim
        self._norm = {k: self._empty(b, 0, h, dtype=_norm_dtype(self.dtype)) for k in _KINDS}
        self._ret = {k: self._empty(b, 0, d) for k in _KINDS}

    @property
    def num_stored(self) -> int:
        return self._norm["k"].shape[1]

    def norms(self, kind: str = "k") -> Tensor:
        """This layer's norms ``[B, S, H]`` of keys or values."""
        return self._norm[kind]

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        lower, t_lower = self.policy._take(self.lower_idx)
        t = k_new.shape[1]
        if (lower.batch_size, lower.n_heads, lower.head_dim, lower.dtype) != \
                (self.batch_size, self.n_heads, self.head_dim, self.dtype):
            raise RuntimeError("MiniCache: the pair's two caches differ in batch size, heads, head dim or dtype")
        if t != t_lower or lower.num_merged != self.num_stored or lower._pend["k"].shape[1] < t or \
                lower._ridx["k"].shape[1] != self._ret["k"].shape[1] or \
                lower._ridx["v"].shape[1] != self._ret["v"].shape[1] or \
                lower._seen - lower._pend["k"].shape[1] != self._seen:
            raise RuntimeError(f"MiniCache: layer {self.lower_idx + 1}'s cache does not line up with layer "
                               f"{self.lower_idx}'s (a pair's caches must be used, copied and loaded together)")
        k_old = lower.restore("k", self._norm["k"], self._ret["k"])
        v_old = lower.restore("v", self._norm["v"], self._ret["v"])
        view = KVView(torch.cat((k_old, k_new), dim=1), torch.cat((v_old, v_new), dim=1), None)
        lower._absorb(self, k_new, v_new)
        self._seen += t
        return view

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"{k}_{f}": getattr(self, f"_{f}")[k] for f in ("norm", "ret") for k in _KINDS}
        out["seen_tokens"] = torch.tensor(self._seen, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = {f"{k}_{f}" for f in ("norm", "ret") for k in _KINDS} | {"seen_tokens"}
        if set(state) != want:
            raise ValueError(f"state must have keys {sorted(want)}, got {sorted(state)}")
        b, h, d = self.batch_size, self.n_heads, self.head_dim
        s = state["k_norm"].shape[1]
        for k in _KINDS:
            r = state[f"{k}_ret"].shape[1]
            for f, shape in (("norm", (b, s, h)), ("ret", (b, r, d))):
                if tuple(state[f"{k}_{f}"].shape) != shape:
                    raise ValueError(f"state['{k}_{f}'] must be {shape}, got {tuple(state[f'{k}_{f}'].shape)}")
        seen = int(state["seen_tokens"])
        if seen < s:
            raise ValueError(f"state['seen_tokens'] ({seen}) is below the stored tokens ({s})")
        self._norm = {k: state[f"{k}_norm"].to(device=self.device, dtype=_norm_dtype(self.dtype)).clone()
                      for k in _KINDS}
        self._ret = {k: state[f"{k}_ret"].to(device=self.device, dtype=self.dtype).clone() for k in _KINDS}
        self._seen = seen

    def reset(self) -> None:
        self._alloc()
        self._seen = 0

    def to(self, device=None, dtype=None) -> "MiniCacheUpper":
        self._device = self._device if device is None else torch.device(device)
        self._dtype = self._dtype if dtype is None else dtype
        self._norm = {k: x.to(device=self._device, dtype=_norm_dtype(self._dtype)) for k, x in self._norm.items()}
        self._ret = {k: x.to(device=self._device, dtype=self._dtype) for k, x in self._ret.items()}
        return self

    def __repr__(self) -> str:
        return (f"MiniCacheUpper(layer={self.lower_idx + 1}, seen_tokens={self._seen}, num_stored={self.num_stored}, "
                f"nbytes={self.nbytes})")
