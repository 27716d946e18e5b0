"""KV caches: the short-term memory's state, and the seam where cache-management policies plug in.

A cache belongs to one attention layer and holds its past keys and values, batch-first: ``[B, S, H, D]`` with S the
number of stored entries and H the number of key/value heads. Keys are stored *after* RoPE, so an entry never needs
to be re-rotated when other entries are dropped or the cache is saved and restored.

Two policies ship:

- ``FullKVCache``: keeps everything (full causal attention); memory grows as O(T).
- ``RollingKVCache(window)``: for sliding-window attention with window W (token t sees keys t-W+1 .. t; Longformer,
  Beltagy et al. 2020, arXiv 2004.05150; Mistral 7B, Jiang et al. 2023, arXiv 2310.06825). The next token only ever
  needs the W-1 most recent past keys (the W-th key it sees is its own), so the cache stores at most ``W - 1``
  entries: memory O(W), independent of how many tokens have streamed through.

Writing a new policy (eviction, compression, quantisation): subclass ``KVCache`` and implement the members marked
abstract. The contract the attention layer relies on is:

1. ``update(k_new, v_new)`` receives the new tokens' (already rotated) keys and values, ``[B, T, H, D]``, records
   them, advances ``seen_tokens`` by T and returns ``(k_all, v_all)``: every key/value the T new queries may see,
   in chronological order, *ending with the T new entries*, and covering positions contiguously (the attention mask
   is aligned to the end of ``k_all``: new query i sits at position ``len(k_all) - T + i``). A quantising or
   compressing cache returns dequantised / reconstructed tensors here.
2. ``window`` tells the layer how many most recent tokens the cache is guaranteed to return (``None``: all of them).
   A layer with sliding window W accepts a cache whose ``window`` is None or >= W, and refuses any other.
3. ``seen_tokens`` is the number of tokens written so far, i.e. the absolute position of the next token (the RoPE
   offset). ``num_stored`` is how many entries are held now.
4. ``state_dict()`` returns plain tensors only (so ``torch.save`` and ``torch.load(weights_only=True)`` work) and
   ``load_state_dict`` restores it, validating shapes.

The contract's extension for policies that drop tokens from the middle, re-rotate keys or store them quantised /
narrowed (``mnemos.kv``; docs/KV.md), all with defaults that keep the two caches above unchanged:

5. ``update_view(k_new, v_new, q=None) -> KVView(keys, values, positions)`` is what ``Attention`` calls. ``q`` is
   the new queries ``[B, T, Hq, D]`` (rotated), for policies that score entries by attention. ``positions`` is None
   when the keys are a contiguous run ending at the new tokens (point 1: the default, which calls ``update``), else
   ``[B, S, H]`` int64: each returned entry's original position, per batch row and key/value head (the layer then
   masks by position: causal, and inside its window). The new tokens still come last.
6. ``rope_offset``: the position the new tokens are rotated at (default ``seen_tokens``; a cache that re-rotates its
   keys to in-cache positions returns the in-cache position of the next token).
7. ``nbytes``: bytes of every tensor the cache holds (packed codes, scales, indices and positions included): the
   non-scalar tensors of ``state_dict``, which must be exactly the tensors the cache object holds.
8. ``kept_positions()``: ``[B, S, H]`` int64, the original positions of the stored entries per row and head.
9. ``tier_nbytes()``: ``nbytes`` split by memory tier, ``{"resident": ..., "offloaded": ...}`` (default: all
   resident). A cache with an offload tier (``mnemos.kv.retrieval``) counts its store as ``offloaded``; the eval
   harness records resident bytes as the state's and the offloaded ones beside them.

``KVPolicy`` is the other half of the seam: an object ``Attention.init_state`` asks for a cache
(``make_cache``) when a policy is set on the layer (``Attention.set_kv_policy``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["KVCache", "KVView", "KVPolicy", "FullKVCache", "RollingKVCache"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class KVCache(ABC):
    """Abstract KV cache for one attention layer. See the module docstring for the contract a policy must keep."""

    @abstractmethod
    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Record ``k_new``/``v_new`` (``[B, T, H, D]``) and return the keys/values the new queries may see."""

    @property
    @abstractmethod
    def window(self) -> int | None:
        """Number of most recent tokens (new ones included) ``update`` always returns; None means all tokens."""

    @property
    @abstractmethod
    def seen_tokens(self) -> int:
        """Tokens written so far: the absolute position of the next token."""

    @property
    @abstractmethod
    def num_stored(self) -> int:
        """Entries held right now (what the memory footprint scales with)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """The cache's state as plain tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state produced by ``state_dict`` of a cache with the same configuration."""

    def __len__(self) -> int:
        return self.num_stored

    # -- the extension for eviction / compression policies (defaults: a contiguous cache at absolute positions) ------
    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        """Record the new entries and return what the new queries see, with positions (None: contiguous suffix).

        ``q`` ``[B, T, Hq, D]`` are the new (rotated) queries; caches that do not score entries ignore it.
        """
        k_all, v_all = self.update(k_new, v_new)
        return KVView(k_all, v_all, None)

    @property
    def rope_offset(self) -> int:
        """The position the next token is rotated at by RoPE (its absolute position, unless keys are re-rotated)."""
        return self.seen_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the cache holds: every non-scalar tensor of ``state_dict``."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values() if t.ndim > 0)

    def kept_positions(self) -> Tensor:
        """``[B, S, H]`` int64: the original position of each stored entry, per batch row and key/value head."""
        raise NotImplementedError(f"{type(self).__name__} does not report its kept positions")

    def tier_nbytes(self) -> dict[str, int]:
        """``nbytes`` by tier: ``{"resident": ..., "offloaded": ...}`` (on the compute device / in an offload store)."""
        return {"resident": self.nbytes, "offloaded": 0}


class KVView(NamedTuple):
    """What the new queries of one ``update_view`` call see: keys ``[B, S, H, D]``, values ``[B, S, H, Dv]`` (the
    new tokens last) and ``positions``: None (a contiguous run ending at the new tokens) or ``[B, S, H]`` int64."""

    keys: Tensor
    values: Tensor
    positions: Tensor | None


class KVPolicy(ABC):
    """A cache-management policy: decides what a layer's cache keeps and how it stores it (``mnemos.kv``).

    ``Attention.set_kv_policy(policy, layer_idx, n_layers)`` attaches one to a layer; the layer's ``init_state`` then
    returns ``policy.make_cache(...)`` instead of its default cache.
    """

    @abstractmethod
    def make_cache(
        self,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        *,
        window: int | None,
        layer_idx: int,
        n_layers: int,
        rope: nn.Module | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> KVCache:
        """An empty cache for one layer: ``n_heads`` key/value heads of ``head_dim``, the layer's sliding ``window``
        (None: full causal), its index among the model's ``n_layers`` attention layers and its rotary embedding."""


class _AppendKVCache(KVCache):
    """Shared storage for caches that keep a contiguous suffix of the stream, at most ``capacity`` entries."""

    def __init__(
        self,
        capacity: int | None,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.n_heads = _check_positive_int("n_heads", n_heads)
        self.head_dim = _check_positive_int("head_dim", head_dim)
        self.value_dim = head_dim if value_dim is None else _check_positive_int("value_dim", value_dim)
        self._capacity = capacity
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self._k = torch.empty(batch_size, 0, n_heads, head_dim, device=device, dtype=dtype)  # [B, 0, H, D]
        self._v = torch.empty(batch_size, 0, n_heads, self.value_dim, device=device, dtype=dtype)  # [B, 0, H, Dv]
        self._seen = 0

    # -- introspection -------------------------------------------------------------------------------------------
    @property
    def seen_tokens(self) -> int:
        return self._seen

    @property
    def num_stored(self) -> int:
        return self._k.shape[1]

    @property
    def keys(self) -> Tensor:
        """Stored keys, ``[B, S, H, D]``, oldest first (rotated by RoPE at their absolute positions)."""
        return self._k

    @property
    def values(self) -> Tensor:
        """Stored values, ``[B, S, H, Dv]``, oldest first."""
        return self._v

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    def kept_positions(self) -> Tensor:
        s = self.num_stored
        pos = torch.arange(self._seen - s, self._seen, device=self.device)  # [S]: a contiguous suffix
        return pos[None, :, None].expand(self.batch_size, s, self.n_heads)  # [B, S, H]

    # -- the policy --------------------------------------------------------------------------------------------------
    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        self._check_new(k_new, v_new)
        k_all = torch.cat((self._k, k_new), dim=1)  # [B, S + T, H, D]
        v_all = torch.cat((self._v, v_new), dim=1)  # [B, S + T, H, Dv]
        self._seen += k_new.shape[1]
        if self._capacity is None:
            self._k, self._v = k_all, v_all
        else:
            keep = min(self._capacity, k_all.shape[1])
            start = k_all.shape[1] - keep
            # clone so the cache does not pin the (possibly long) storage of k_all / v_all: memory stays O(capacity)
            self._k = k_all[:, start:].clone()  # [B, keep, H, D]
            self._v = v_all[:, start:].clone()  # [B, keep, H, Dv]
        return k_all, v_all

    def reset(self) -> None:
        """Forget everything (keeps batch size, heads, dtype and device)."""
        self._k = self._k[:, :0].clone()
        self._v = self._v[:, :0].clone()
        self._seen = 0

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "_AppendKVCache":
        """Move / cast the stored tensors in place and return self."""
        self._k = self._k.to(device=device, dtype=dtype)
        self._v = self._v.to(device=device, dtype=dtype)
        return self

    # -- serialisation -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"k": self._k, "v": self._v, "seen_tokens": torch.tensor(self._seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = {"k", "v", "seen_tokens"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}, got keys {sorted(state)}")
        k, v, seen = state["k"], state["v"], int(state["seen_tokens"])
        if k.ndim != 4 or k.shape[0] != self.batch_size or k.shape[2:] != (self.n_heads, self.head_dim):
            want = f"[B={self.batch_size}, S, H={self.n_heads}, D={self.head_dim}]"
            raise ValueError(f"state['k'] must be {want}, got {tuple(k.shape)}")
        if v.shape != (k.shape[0], k.shape[1], self.n_heads, self.value_dim):
            raise ValueError(f"state['v'] must be {tuple(k.shape[:3]) + (self.value_dim,)}, got {tuple(v.shape)}")
        if self._capacity is not None and k.shape[1] > self._capacity:
            raise ValueError(
                f"state['k'] holds {k.shape[1]} entries, more than this cache's capacity {self._capacity}"
            )
        if seen < k.shape[1]:
            raise ValueError(f"state['seen_tokens'] must be >= the {k.shape[1]} stored entries, got {seen}")
        self._k = k.to(device=self.device, dtype=self.dtype).clone()
        self._v = v.to(device=self.device, dtype=self.dtype).clone()
        self._seen = seen

    # -- validation --------------------------------------------------------------------------------------------------
    def _check_new(self, k_new: Tensor, v_new: Tensor) -> None:
        if k_new.ndim != 4 or v_new.ndim != 4:
            raise ValueError(
                f"k_new and v_new must be [B, T, H, D] (rank 4), got {tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        want_k = (self.batch_size, k_new.shape[1], self.n_heads, self.head_dim)
        if tuple(k_new.shape) != want_k:
            raise ValueError(f"k_new must be [B, T, H, D] = {want_k}, got {tuple(k_new.shape)}")
        want_v = (self.batch_size, k_new.shape[1], self.n_heads, self.value_dim)
        if tuple(v_new.shape) != want_v:
            raise ValueError(f"v_new must be [B, T, H, Dv] = {want_v}, got {tuple(v_new.shape)}")
        if k_new.dtype != self.dtype or v_new.dtype != self.dtype:
            raise ValueError(f"k_new/v_new dtype must be the cache's {self.dtype}, got {k_new.dtype}/{v_new.dtype}")
        if k_new.device != self.device or v_new.device != self.device:
            raise ValueError(f"k_new/v_new must be on the cache's device {self.device}, got {k_new.device}")


class FullKVCache(_AppendKVCache):
    """Keeps every key and value: the state of full causal attention. Memory O(T).

    Args:
        batch_size: B. n_heads: H, the number of key/value heads. head_dim: D. value_dim: Dv (default D).
        device, dtype: of the stored tensors (defaults: CPU, torch's default dtype).

    Example:
        >>> cache = FullKVCache(batch_size=2, n_heads=4, head_dim=8)
        >>> k, v = cache.update(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8))
        >>> k.shape, cache.seen_tokens, cache.num_stored
        (torch.Size([2, 3, 4, 8]), 3, 3)
    """

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(None, batch_size, n_heads, head_dim, value_dim=value_dim, device=device, dtype=dtype)

    @property
    def window(self) -> int | None:
        return None

    def __repr__(self) -> str:
        return (
            f"FullKVCache(batch_size={self.batch_size}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
            f"seen_tokens={self.seen_tokens}, num_stored={self.num_stored})"
        )


class RollingKVCache(_AppendKVCache):
    """Keeps the last ``window - 1`` keys/values: the state of sliding-window attention with window W.

    Token t attends to keys t-W+1 .. t (Longformer, Beltagy et al. 2020; Mistral 7B, Jiang et al. 2023), so between
    calls only the W-1 most recent keys can still be seen by a future token; ``update`` returns those plus the new
    ones, and the cache never holds more than W-1 entries (memory O(W) however long the stream).

    Args:
        window: W >= 1. batch_size: B. n_heads: H (key/value heads). head_dim: D. value_dim: Dv (default D).
        device, dtype: of the stored tensors.

    Example:
        >>> cache = RollingKVCache(3, batch_size=1, n_heads=1, head_dim=2)
        >>> for _ in range(5):
        ...     k, v = cache.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
        >>> k.shape[1], cache.num_stored, cache.seen_tokens
        (3, 2, 5)
    """

    def __init__(
        self,
        window: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._window = _check_positive_int("window", window)
        super().__init__(window - 1, batch_size, n_heads, head_dim, value_dim=value_dim, device=device, dtype=dtype)

    @property
    def window(self) -> int | None:
        return self._window

    @property
    def capacity(self) -> int:
        """Most entries ever stored: ``window - 1``."""
        return self._window - 1

    def __repr__(self) -> str:
        return (
            f"RollingKVCache(window={self.window}, batch_size={self.batch_size}, n_heads={self.n_heads}, "
            f"head_dim={self.head_dim}, seen_tokens={self.seen_tokens}, num_stored={self.num_stored})"
        )
