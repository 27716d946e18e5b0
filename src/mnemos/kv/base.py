"""What every policy shares: budgets, the policy base class, the eviction cache, and attaching a policy to a model.

The contract (docs/KV.md has the long form):

- A **policy** (``Policy``, a ``mnemos.layers.KVPolicy``) is a small configuration object: it validates its arguments
  once, and ``make_cache(...)`` builds one layer's cache. ``apply_kv_policy(model, policy)`` (or
  ``with policy(model): ...``) sets it on every ``mnemos.layers.Attention`` of a model, numbering them
  ``0 .. n_layers - 1`` in module order; ``model.init_cache`` then returns caches of that policy.
- A **cache** (a ``mnemos.layers.KVCache``) receives each call's new keys, values and queries in ``update_view``,
  returns what those queries see (with positions when entries were evicted from the middle), and then stores only
  what the policy keeps. It reports ``nbytes`` (every tensor it holds) and ``kept_positions()`` (``[B, S, H]``).
- The **eviction cache** (``EvictingKVCache``) serves every token-eviction policy: an ``EvictionPolicy`` gives a keep
  priority per visible entry (``scores``) and a token budget (``target``); the cache keeps the ``target`` entries of
  highest priority per batch row and key/value head, in position order.

Budgets: an ``int`` is a number of tokens; a ``float`` in (0, 1] is the fraction of the tokens seen so far,
``floor(ratio * seen)`` (at least 1), resolved at every call (so a ratio budget grows with the stream, an absolute one
bounds the cache); ``Bytes(n)`` is n bytes per sequence and layer, ``floor(n / bytes per entry)`` tokens, where an
entry's bytes are everything the cache stores for one token of one sequence (keys, values, position, the policy's
per-entry state, over all key/value heads).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from mnemos.layers.attention import Attention
from mnemos.layers.kv_cache import FullKVCache, KVCache, KVPolicy, KVView, RollingKVCache
from mnemos.layers.rope import rotate_half

__all__ = [
    "NamedTensorsCache",
    "Bytes", "Policy", "EvictionPolicy", "EvictionContext", "EvictingKVCache", "apply_kv_policy", "use_kv_policy",
    "attention_layers", "check_budget", "resolve_budget", "attention_probs", "default_cache",
]


# ----------------------------------------------------------------------------------------------------------------------
# argument checks shared by the policies


class Bytes(int):
    """A budget in bytes per sequence and layer: ``SnapKV(Bytes(64 * 1024))``."""

    def __new__(cls, n: int) -> "Bytes":
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"budget in bytes must be a positive int, got {n!r}")
        return super().__new__(cls, n)

    def __repr__(self) -> str:
        return f"Bytes({int(self)})"


def check_budget(budget: object, name: str = "budget") -> int | float:
    """An ``int`` >= 1 (tokens), a ``float`` ratio in (0, 1] (fraction of the tokens seen) or ``Bytes(n)``; else
    ValueError."""
    if isinstance(budget, Bytes):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"{name} must be an int (tokens), a float ratio in (0, 1] or Bytes(n), got {budget!r}")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"{name} must be a positive number of tokens, got {budget}")
        return budget
    if not (0.0 < budget <= 1.0):
        raise ValueError(f"{name} as a ratio must lie in (0, 1], got {budget}")
    return float(budget)


def resolve_budget(budget: int | float, seen: int, entry_bytes: int | Callable[[int], int] = 1) -> int:
    """Tokens a budget allows after ``seen`` tokens: the int itself, ``max(1, floor(ratio * seen))``, or for
    ``Bytes(n)`` ``max(1, n // entry_bytes)`` (``entry_bytes``: what one token costs the cache, per sequence; or a
    function giving the tokens n bytes hold, for a cache whose cost per token is not constant: a composition's packed
    storage, ``EvictingKVCache.tokens_in_bytes``)."""
    if isinstance(budget, Bytes):
        n = int(budget)
        return max(1, entry_bytes(n) if callable(entry_bytes) else n // entry_bytes)
    if isinstance(budget, int):
        return budget
    return max(1, math.floor(budget * seen + 1e-9))


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_ratio(name: str, value: object, lo: float, hi: float, *, hi_open: bool = False) -> float:
    """A float in [lo, hi] (or [lo, hi) with ``hi_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
    value = float(value)
    if not (lo <= value <= hi) or (hi_open and value >= hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return value


def default_cache(
    batch_size: int, n_heads: int, head_dim: int, window: int | None, device, dtype
) -> KVCache:
    """The cache a layer has without a policy: ``RollingKVCache(window)`` or ``FullKVCache``."""
    if window is None:
        return FullKVCache(batch_size, n_heads, head_dim, device=device, dtype=dtype)
    return RollingKVCache(window, batch_size, n_heads, head_dim, device=device, dtype=dtype)


def attention_probs(
    q: Tensor, keys: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, scale: float | None = None
) -> Tensor:
    """Float32 attention probabilities of queries over cached keys, per query head, grouped by key/value head.

    Args:
        q: ``[B, Tq, Hq, D]`` (rotated) queries at positions ``q_pos`` ``[Tq]``.
        keys: ``[B, S, Hkv, D]`` at positions ``k_pos`` ``[B, S, Hkv]``; query head h reads key head ``h // g``.
        window: the layer's sliding window (None: full causal).

    Returns:
        ``[B, Hkv, g, Tq, S]``: ``softmax(q k^T * scale)`` over the keys each query can see (causal by position and
        inside the window), computed in float32; g = Hq / Hkv. Prefix / persistent keys are not part of it.
    """
    b, t, hq, d = q.shape
    h_kv = keys.shape[2]
    g = hq // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float().reshape(b, t, h_kv, g, d)  # [B, Tq, Hkv, g, D]: query head h = kv head h // g, member h % g
    s = torch.einsum("bthgd,bshd->bhgts", qf, keys.float()) * scale  # [B, Hkv, g, Tq, S]
    kp = k_pos.permute(0, 2, 1)[:, :, None, None, :]  # [B, Hkv, 1, 1, S]
    qp = q_pos[None, None, None, :, None]  # [1, 1, 1, Tq, 1]
    visible = kp <= qp
    if window is not None:
        visible = visible & (qp - kp < window)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, dim=-1)  # [B, Hkv, g, Tq, S]


def rerotate(x: Tensor, delta: Tensor, rope: nn.Module) -> Tensor:
    """Rotate keys already rotated by RoPE by a further ``delta`` positions each: ``R(delta) R(p) k = R(p + delta) k``.

    ``x`` ``[B, S, H, D]``, ``delta`` ``[B, S, H]`` (int, may be negative); channel i pairs with i + D/2. ``rope``
    gives the frequencies: ``rope.rerotation_inv_freq(device)`` (``[D/2]`` float64) when it has that method (a Hugging
    Face model's own rotary frequencies, ``mnemos.kv.hf``), else ``base ** (-2i / D)`` from its ``base``
    (``mnemos.layers.RotaryEmbedding``).
    """
    d = x.shape[-1]
    own = getattr(rope, "rerotation_inv_freq", None)
    inv_freq = own(x.device) if own is not None else \
        float(rope.base) ** (-torch.arange(d // 2, dtype=torch.float64, device=x.device) * 2.0 / d)  # [D/2]
    ang = delta.to(torch.float64)[..., None] * inv_freq  # [B, S, H, D/2]
    ang = torch.cat((ang, ang), dim=-1)  # [B, S, H, D]
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(dt)
    return (xc * ang.cos().to(dt) + rotate_half(xc) * ang.sin().to(dt)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# the policy base and attaching it to a model


class Policy(KVPolicy):
    """Base of mnemos' policies: ``with policy(model): ...`` attaches it to every attention layer for the block."""

    needs_queries: bool = False  # whether its caches score with the call's queries (update_view's q)

    def __call__(self, model: nn.Module):
        if _is_hf_model(model):
            from mnemos.kv.hf import hf_kv_policy  # transformers is imported only for Hugging Face models

            return hf_kv_policy(model, self)
        return use_kv_policy(model, self)

    def check_layer(self, attn: Attention) -> None:
        """Raise ValueError if the policy cannot serve this layer (e.g. a group size that does not divide D)."""

    def hf_refusal(self) -> str | None:
        """Why the policy cannot run on a Hugging Face model (``mnemos.kv.hf``), or None (it can)."""
        return None

    def mac_refusal(self) -> str | None:
        """Why the policy cannot serve MAC's segment attention (:class:`~mnemos.models.titans.MemoryAsContext`:
        its cache emptied at every segment boundary, keys rotated from the segment start), or None (it can)."""
        return None

    def prepare(self, model: nn.Module) -> None:
        """Called by ``apply_kv_policy`` before the policy is set on ``model``: policies that measure the model first
        (a scoring pass: DuoAttention's retrieval heads, D2O's layer budgets) do it here; nothing by default."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _is_hf_model(model: object) -> bool:
    """A Hugging Face model (a ``transformers`` ``PreTrainedModel``) without mnemos attention layers."""
    is_hf = any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
                for c in type(model).__mro__)
    return is_hf and not any(isinstance(m, Attention) for m in model.modules())


def attention_layers(model: nn.Module) -> list[Attention]:
    """The ``Attention`` modules of ``model`` whose caches ``init_state`` builds, in module order.

    Raises ValueError if there is none. MAC's segment attention is one of them: under a policy its segment's tokens
    go through the policy's cache (emptied at every segment boundary), its retrieved tokens stay beside it unevicted.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no attention layer (mnemos.layers.Attention) for a KV "
                         "policy to manage")
    return layers


def apply_kv_policy(model: nn.Module, policy: KVPolicy | None) -> nn.Module:
    """Set ``policy`` (None: remove it) on every attention layer of ``model``; returns the model.

    Caches made afterwards (``model.init_cache``, ``layer.init_state``) follow the policy; existing ones are unchanged.
    """
    if policy is not None and not isinstance(policy, KVPolicy):
        raise ValueError(f"policy must be a KVPolicy or None, got {type(policy).__name__}")
    layers = attention_layers(model)
    if isinstance(policy, Policy):
        # matched by name: mnemos.kv sits below mnemos.models in the import graph
        refusal = policy.mac_refusal() if any(type(m).__name__ == "MemoryAsContext" for m in model.modules()) \
            else None
        if refusal:
            raise ValueError(f"model holds a MAC mixer (MemoryAsContext): {refusal}")
        for attn in layers:
            policy.check_layer(attn)
        policy.prepare(model)
    for i, attn in enumerate(layers):
        attn.set_kv_policy(policy, i, len(layers))
    return model


@contextmanager
def use_kv_policy(model: nn.Module, policy: KVPolicy | None) -> Iterator[nn.Module]:
    """``with use_kv_policy(model, policy):`` (or ``with policy(model):``): the policy for the block, then the
    layers' previous policies back."""
    layers = attention_layers(model)
    before = [(a.kv_policy, a.kv_layer) for a in layers]
    apply_kv_policy(model, policy)
    try:
        yield model
    finally:
        for a, (p, (i, n)) in zip(layers, before, strict=True):
            a.set_kv_policy(p, i, n)


# ----------------------------------------------------------------------------------------------------------------------
# token eviction


class NamedTensorsCache(KVCache):
    """What a cache that stores its entries as named tensors (``_NAMES``, each ``[B, S, ...]`` along tokens) and a
    token count ``_seen`` shares: device / dtype moves (integer codes and indices keep their dtype), the
    ``state_dict`` round trip and ``reset``. A subclass checks a loaded state's shapes in ``_check_loaded``."""

    _NAMES: tuple[str, ...] = ()
    _seen: int

    @property
    def seen_tokens(self) -> int:
        return self._seen

    def kept_positions(self) -> Tensor:
        """The last ``num_stored`` positions of the stream, for every row and head (these caches evict nothing
        from the middle): ``[B, S, H]``."""
        s = self.num_stored
        pos = torch.arange(self._seen - s, self._seen, device=self.device)
        return pos[None, :, None].expand(self.batch_size, s, self.n_heads)  # [B, S, H]

    def reset(self) -> None:
        for n in self._NAMES:
            setattr(self, n, getattr(self, n)[:, :0].clone())
        self._seen = 0

    def to(self, device=None, dtype=None):
        for n in self._NAMES:
            t = getattr(self, n)
            setattr(self, n, t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        return self

    def state_dict(self) -> dict[str, Tensor]:
        out = {n: getattr(self, n) for n in self._NAMES}
        out["seen_tokens"] = torch.tensor(self._seen, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = set(self._NAMES) | {"seen_tokens"}
        if set(state) != want:
            raise ValueError(f"state must have keys {sorted(want)}, got {sorted(state)}")
        self._check_loaded(state)
        for n in self._NAMES:
            cur = getattr(self, n)
            setattr(self, n, state[n].to(device=cur.device, dtype=cur.dtype).clone())
        self._seen = int(state["seen_tokens"])

    def _check_loaded(self, state: dict[str, Tensor]) -> None:
        """Raise a ValueError unless ``state``'s tensors fit this cache (all keys are present)."""
        raise NotImplementedError


@dataclass
class EvictionContext:
    """What an ``EvictionPolicy`` scores, for one ``update_view`` call of one layer.

    Attributes:
        q: ``[B, T, Hq, D]`` the call's (rotated) queries, or None if the caller gave none.
        keys, values: ``[B, S, H, D]`` / ``[B, S, H, Dv]``: the visible entries (stored, then the T new ones), in
            position order per batch row and head.
        positions: ``[B, S, H]`` int64 original positions of those entries; ``q_positions``: ``[T]`` of the queries.
        target: entries the budget allows after this call; ``over_budget``: whether S exceeds what will be kept.
        window: the layer's sliding window (None: full causal). layer_idx / n_layers: the layer among the model's.
        state: per-entry float32 tensors ``[B, S, H]`` the policy carries (``EvictionPolicy.entry_state``), new entries
            zero; a policy updates them in place (e.g. H2O's accumulated attention).
        extra: the policy's per-cache tensors (``EvictionPolicy.cache_state``: batch-first, not per entry, e.g.
            Scissorhands' query history, D2O's merge threshold); a policy replaces them in the dict.
    """

    q: Tensor | None
    keys: Tensor
    values: Tensor
    positions: Tensor
    q_positions: Tensor
    target: int
    over_budget: bool
    window: int | None
    layer_idx: int
    n_layers: int
    state: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    keep: int | None = None  # set by a policy that keeps fewer than ``target`` this call (Scissorhands drops m at once)

    @property
    def n_new(self) -> int:
        return self.q_positions.numel()


class EvictionPolicy(Policy):
    """A token-eviction policy: a budget and a keep priority per visible entry (``EvictingKVCache`` does the rest).

    Subclasses set ``entry_state`` (names of per-entry float32 tensors the cache carries along) and implement
    ``scores``; ``target`` may be overridden (PyramidKV's per-layer budgets).
    """

    entry_state: tuple[str, ...] = ()
    rerotate: bool = False  # re-rotate kept keys to in-cache positions after each eviction (StreamingLLM's option)

    def mac_refusal(self) -> str | None:
        if self.rerotate:
            return ("rerotate=True moves kept keys to in-cache positions, but MAC's queries also attend to the "
                    "segment's retrieved tokens at their own positions; use rerotate=False")
        return None

    def __init__(self, budget: int | float) -> None:
        self.budget = check_budget(budget)

    def target(self, seen: int, layer_idx: int, n_layers: int, entry_bytes: int = 1) -> int:
        """Entries this layer may keep once ``seen`` tokens have been written (``entry_bytes``: bytes one stored
        token costs per sequence, for ``Bytes`` budgets)."""
        return resolve_budget(self.budget, seen, entry_bytes)

    def skips_layer(self, layer_idx: int, n_layers: int) -> bool:
        """Layers the policy leaves alone (they get the default cache)."""
        return False

    def cache_state(self, batch_size: int, n_heads: int, head_dim: int, device, dtype) -> dict[str, Tensor]:
        """The per-cache tensors (batch-first, not per entry) a new cache starts with (none by default); they are
        part of the cache's ``state_dict`` (``extra.<name>``) and of its ``nbytes``."""
        return {}

    def merge(self, ctx: EvictionContext, idx: Tensor) -> tuple[Tensor, Tensor] | None:
        """Called when a call evicts: ``idx`` ``[B, K, H]`` are the kept entries' indices into ``ctx.keys`` (position
        order); return the keys ``[B, K, H, D]`` and values ``[B, K, H, Dv]`` to store for them (D2O merges evicted
        entries into kept ones), or None to store the kept entries as they are (the default)."""
        return None

    @abstractmethod
    def scores(self, ctx: EvictionContext) -> Tensor | None:
        """``[B, S, H]`` keep priority of each visible entry (higher is kept first; ties are broken arbitrarily), or
        None: this call evicts nothing (beyond entries that fell out of a sliding window)."""

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        if self.skips_layer(layer_idx, n_layers):
            return default_cache(batch_size, n_heads, head_dim, window, device, dtype)
        return EvictingKVCache(self, batch_size, n_heads, head_dim, window=window, layer_idx=layer_idx,
                               n_layers=n_layers, rope=rope, device=device, dtype=dtype)


class EvictingKVCache(KVCache):
    """A cache that keeps, per batch row and key/value head, the entries an ``EvictionPolicy`` ranks highest.

    Holds keys ``[B, S, H, D]`` (rotated at their original positions, or at in-cache positions ``0 .. S-1`` when the
    policy re-rotates), values ``[B, S, H, Dv]``, their original positions ``[B, S, H]`` (int32) and the policy's
    per-entry state (float32 ``[B, S, H]`` each), all in position order per row and head; S is the same for every row
    and head. ``nbytes`` counts all of them.

    One call (``update_view``): the visible entries are the stored ones followed by the T new ones; they are returned
    (with their positions) for the new queries to attend to, then the policy scores them and the cache keeps the
    ``min(target, live)`` of highest priority, where an entry is live unless it has left the layer's sliding window
    (dead entries go first and are masked by position if some must stay to keep S equal across heads).
    """

    def __init__(self, policy: EvictionPolicy, batch_size: int, n_heads: int, head_dim: int, *, window=None,
                 layer_idx: int = 0, n_layers: int = 1, rope: nn.Module | None = None, value_dim: int | None = None,
                 device=None, dtype=None) -> None:
        self.policy = policy
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.head_dim = check_int("head_dim", head_dim, 1)
        self.value_dim = head_dim if value_dim is None else check_int("value_dim", value_dim, 1)
        self.layer_window = window
        self.layer_idx, self.n_layers = layer_idx, n_layers
        if policy.rerotate and rope is None:
            raise ValueError("rope must be given to a cache whose policy re-rotates keys")
        self.rope = rope
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self._k = torch.empty(batch_size, 0, n_heads, head_dim, device=device, dtype=dtype)  # [B, 0, H, D]
        self._v = torch.empty(batch_size, 0, n_heads, self.value_dim, device=device, dtype=dtype)  # [B, 0, H, Dv]
        self._pos = torch.empty(batch_size, 0, n_heads, device=device, dtype=torch.int32)  # [B, 0, H]
        self._state = {n: torch.empty(batch_size, 0, n_heads, device=device, dtype=torch.float32)
                       for n in policy.entry_state}
        self._extra = policy.cache_state(batch_size, n_heads, head_dim, device, dtype)
        self._seen = 0
        self._rot_next = 0  # re-rotating policies: the in-cache RoPE position of the next token

    # -- introspection -----------------------------------------------------------------------------------------------
    @property
    def window(self) -> int | None:
        return None  # no guarantee of a contiguous recent run: the layer masks by position

    @property
    def seen_tokens(self) -> int:
        return self._seen

    @property
    def num_stored(self) -> int:
        return self._k.shape[1]

    @property
    def rope_offset(self) -> int:
        return self._rot_next if self.policy.rerotate else self._seen

    @property
    def keys(self) -> Tensor:
        return self._k

    @property
    def values(self) -> Tensor:
        return self._v

    @property
    def entry_state(self) -> dict[str, Tensor]:
        """The policy's per-entry state, ``{name: [B, S, H] float32}`` (H2O: ``score``, the accumulated attention)."""
        return dict(self._state)

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    def kept_positions(self) -> Tensor:
        return self._pos.long()

    @property
    def entry_bytes(self) -> int:
        """Bytes one stored token costs per sequence: keys, values, its int32 position and the per-entry state, over
        every key/value head."""
        elem = self._k.element_size()
        return self.n_heads * ((self.head_dim + self.value_dim) * elem + 4 + 4 * len(self._state))

    def tokens_in_bytes(self, n: int) -> int:
        """Entries that ``n`` bytes per sequence hold (a ``Bytes`` budget): ``n // entry_bytes``; a cache that stores
        entries in a form whose cost per token varies (a composition's packed KIVI storage) overrides it."""
        return n // self.entry_bytes

    # -- the policy --------------------------------------------------------------------------------------------------
    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        view = self.update_view(k_new, v_new)
        return view.keys, view.values

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        if self.policy.needs_queries and q is None:
            raise ValueError(f"{type(self.policy).__name__} scores entries by attention: update_view needs q")
        b, t, h, _ = k_new.shape
        start, seen = self._seen, self._seen + t
        dev = k_new.device
        q_pos = torch.arange(start, seen, device=dev)  # [T]
        keys = torch.cat((self._k, k_new), dim=1)  # [B, S, H, D]
        values = torch.cat((self._v, v_new), dim=1)  # [B, S, H, Dv]
        pos = torch.cat((self._pos.long(), q_pos[None, :, None].expand(b, t, h)), dim=1)  # [B, S, H]
        state = {n: torch.cat((s, s.new_zeros(b, t, h)), dim=1) for n, s in self._state.items()}  # [B, S, H] each
        n_vis = keys.shape[1]
        live = None if self.layer_window is None else pos > seen - self.layer_window  # [B, S, H]
        n_live = n_vis if live is None else int(live.sum(dim=1).max())
        target = self.policy.target(seen, self.layer_idx, self.n_layers, self.tokens_in_bytes)
        ctx = EvictionContext(q, keys, values, pos, q_pos, target, n_vis > min(target, n_live), self.layer_window,
                              self.layer_idx, self.n_layers, state, dict(self._extra))
        prio = self.policy.scores(ctx)  # [B, S, H] or None
        n_keep = min(n_vis if prio is None else target if ctx.keep is None else ctx.keep, n_live)
        self._seen = seen
        if n_keep >= n_vis:
            kept = (keys, values, pos, ctx.state)
        else:
            rank = pos.to(torch.float64) if prio is None else prio.to(torch.float64)
            if live is not None:
                rank = rank.masked_fill(~live, float("-inf"))
            idx = rank.topk(n_keep, dim=1).indices.sort(dim=1).values  # [B, n_keep, H], in position order
            merged = self.policy.merge(ctx, idx)
            k_kept, v_kept = merged if merged is not None else (_gather(keys, idx), _gather(values, idx))
            kept = (k_kept, v_kept, pos.gather(1, idx), {n: s.gather(1, idx) for n, s in ctx.state.items()})
            if self.policy.rerotate:  # close the gaps the policy opened: shift keys back by the evictions before them
                evicted = torch.ones_like(pos, dtype=torch.bool).scatter(1, idx, False)  # [B, S, H]
                if live is not None:
                    evicted = evicted & live  # entries that merely left the sliding window open no gap
                closed = evicted.sum(dim=1)  # [B, H]
                if bool((closed != closed.flatten()[0]).any()):
                    raise RuntimeError("a re-rotating policy must evict the same number of entries in every row "
                                       "and head (one RoPE offset per layer)")
                delta = -evicted.cumsum(dim=1).gather(1, idx)  # [B, n_keep, H]: evictions before each kept entry
                kept = (rerotate(kept[0], delta, self.rope),) + kept[1:]
                self._rot_next -= int(closed.flatten()[0])
        self._rot_next += t
        k_s, v_s, p_s, st = kept
        # copies, so that the cache never pins the call's (possibly long) concatenations
        self._k, self._v = k_s.clone() if k_s is keys else k_s, v_s.clone() if v_s is values else v_s
        self._pos = p_s.to(torch.int32)
        self._state = {n: s.clone() for n, s in st.items()}
        self._extra = {n: ctx.extra[n] for n in self._extra}
        return KVView(keys, values, pos)

    def reset(self) -> None:
        self._k, self._v, self._pos = self._k[:, :0].clone(), self._v[:, :0].clone(), self._pos[:, :0].clone()
        self._state = {n: s[:, :0].clone() for n, s in self._state.items()}
        self._extra = self.policy.cache_state(self.batch_size, self.n_heads, self.head_dim, self.device, self.dtype)
        self._seen = self._rot_next = 0

    def to(self, device=None, dtype=None) -> "EvictingKVCache":
        self._k = self._k.to(device=device, dtype=dtype)
        self._v = self._v.to(device=device, dtype=dtype)
        self._pos = self._pos.to(device=device)
        self._state = {n: s.to(device=device) for n, s in self._state.items()}
        self._extra = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                       for n, t in self._extra.items()}
        return self

    # -- serialisation -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        out = {"k": self._k, "v": self._v, "positions": self._pos}
        out.update({f"state.{n}": s for n, s in self._state.items()})
        out.update({f"extra.{n}": t for n, t in self._extra.items()})
        out["seen_tokens"] = torch.tensor(self._seen, dtype=torch.int64)
        out["rope_offset"] = torch.tensor(self._rot_next, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = {"k", "v", "positions", "seen_tokens", "rope_offset"} | {f"state.{n}" for n in self._state} | \
            {f"extra.{n}" for n in self._extra}
        if set(state) != want:
            raise ValueError(f"state must have keys {sorted(want)}, got {sorted(state)}")
        k, v, pos, seen = state["k"], state["v"], state["positions"], int(state["seen_tokens"])
        shape = (self.batch_size, k.shape[1], self.n_heads)
        if k.ndim != 4 or tuple(k.shape) != shape + (self.head_dim,):
            raise ValueError(f"state['k'] must be [B, S, H, D] = {shape + (self.head_dim,)}, got {tuple(k.shape)}")
        if tuple(v.shape) != shape + (self.value_dim,):
            raise ValueError(f"state['v'] must be {shape + (self.value_dim,)}, got {tuple(v.shape)}")
        for name in ["positions"] + [f"state.{n}" for n in self._state]:
            if tuple(state[name].shape) != shape:
                raise ValueError(f"state[{name!r}] must be {shape}, got {tuple(state[name].shape)}")
        if seen < k.shape[1]:
            raise ValueError(f"state['seen_tokens'] must be >= the {k.shape[1]} stored entries, got {seen}")
        for n, cur in self._extra.items():
            new = state[f"extra.{n}"]
            if new.ndim != cur.ndim or new.shape[0] != self.batch_size:
                raise ValueError(f"state['extra.{n}'] must be batch-first of rank {cur.ndim} with {self.batch_size} "
                                 f"rows, got {tuple(new.shape)}")
        self._extra = {n: state[f"extra.{n}"].to(device=self.device, dtype=cur.dtype).clone()
                       for n, cur in self._extra.items()}
        self._k = k.to(device=self.device, dtype=self.dtype).clone()
        self._v = v.to(device=self.device, dtype=self.dtype).clone()
        self._pos = pos.to(device=self.device, dtype=torch.int32).clone()
        self._state = {n: state[f"state.{n}"].to(device=self.device, dtype=torch.float32).clone()
                       for n in self._state}
        self._seen, self._rot_next = seen, int(state["rope_offset"])

    def __repr__(self) -> str:
        return (f"EvictingKVCache(policy={self.policy!r}, layer={self.layer_idx}/{self.n_layers}, "
                f"seen_tokens={self._seen}, num_stored={self.num_stored}, nbytes={self.nbytes})")


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, S, H, D]`` at ``idx [B, K, H]`` along S -> ``[B, K, H, D]``."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _check_new(cache, k_new: Tensor, v_new: Tensor) -> None:
    """Shapes, dtype and device of one call's new keys/values against a cache's configuration."""
    if not isinstance(k_new, Tensor) or not isinstance(v_new, Tensor) or k_new.ndim != 4 or v_new.ndim != 4:
        raise ValueError("k_new and v_new must be [B, T, H, D] tensors (rank 4)")
    want_k = (cache.batch_size, k_new.shape[1], cache.n_heads, cache.head_dim)
    if tuple(k_new.shape) != want_k:
        raise ValueError(f"k_new must be [B, T, H, D] = {want_k}, got {tuple(k_new.shape)}")
    want_v = (cache.batch_size, k_new.shape[1], cache.n_heads, cache.value_dim)
    if tuple(v_new.shape) != want_v:
        raise ValueError(f"v_new must be [B, T, H, Dv] = {want_v}, got {tuple(v_new.shape)}")
    if k_new.dtype != cache.dtype or v_new.dtype != cache.dtype:
        raise ValueError(f"k_new/v_new dtype must be the cache's {cache.dtype}, got {k_new.dtype}/{v_new.dtype}")
