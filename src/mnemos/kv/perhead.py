"""Per-head policies in the style of DuoAttention (Xiao et al. 2024, arXiv 2410.10819, sec. 3) and RazorAttention
(Tang et al. 2024, arXiv 2407.15891, sec. 3): *retrieval* heads keep every entry, *streaming* heads keep attention
sinks and a recent window, in prefill (streamed or not) and in decoding, so a streaming head's cache has a constant
size.

Which heads retrieve is decided by a scoring pass the policy runs on the model when it is applied
(``mnemos.kv.calibrate``): random tokens repeated, each key/value head scored by the attention the second copy's
queries give to the earlier occurrence of their token and to the token after it (echo + induction, RazorAttention's
criterion; DuoAttention instead trains a gate per head, which mnemos does not). The ``retrieval_ratio`` of all
(layer, key/value head) pairs with the highest scores are retrieval heads (DuoAttention's deployment: a global
quantile of the head scores). Heads can also be given explicitly (``retrieval_heads``).

Storage (``HeadSplitCache``): retrieval heads ``[B, S_r, H_r, D]`` (every token, or the last W - 1 on a sliding
window layer), streaming heads ``[B, S_s, H_s, D]`` (``S_s <= sinks + recent``); positions are implied (nothing
stored but keys and values). Attention reads one ``[B, max(S_r, S_s), H, D]`` view in which the shorter side is
padded with entries at an unreachable position (masked), so the bytes saved are real.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnemos.kv.base import Policy, _check_new, check_int, check_ratio
from mnemos.kv.calibrate import attention_maps, induction_scores, scoring_length, synthetic_ids
from mnemos.layers.kv_cache import KVCache, KVView

__all__ = ["DuoAttention", "HeadSplitCache", "choose_retrieval_heads"]

_HIDDEN = 2**62  # a position no query reaches: padding entries are masked out


def choose_retrieval_heads(scores: list[Tensor], ratio: float) -> tuple[tuple[int, ...], ...]:
    """The retrieval heads per layer: the ``round(ratio * L * Hkv)`` (layer, head) pairs of highest score (ties:
    the earlier layer, then head), from per-layer scores ``[Hkv]``."""
    flat = [(float(s), layer, h) for layer, sc in enumerate(scores) for h, s in enumerate(sc.tolist())]
    n = round(ratio * len(flat))
    top = sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:n]
    return tuple(tuple(sorted(h for _, layer, h in top if layer == i)) for i in range(len(scores)))


class DuoAttention(Policy):
    """Retrieval heads keep everything, streaming heads ``sinks`` + ``recent`` (the module docstring).

    Args:
        retrieval_ratio: the fraction of (layer, key/value head) pairs kept whole, in [0, 1]; default 0.5 (the
            DuoAttention README's sparsity 0.5).
        sinks, recent: what a streaming head keeps; defaults 64 and 256 (the README's deployment).
        retrieval_heads: per attention layer, the indices of its retrieval key/value heads; given, no scoring pass
            runs and ``retrieval_ratio`` is unused.
        calibration_length, calibration_samples, seed: the scoring pass' data (``samples`` rows of ``length``
            random tokens, repeated); run once per model object, when the policy is applied.
    """

    def __init__(self, retrieval_ratio: float = 0.5, *, sinks: int = 64, recent: int = 256,
                 retrieval_heads: tuple[tuple[int, ...], ...] | None = None, calibration_length: int = 32,
                 calibration_samples: int = 4, seed: int = 0) -> None:
        self.retrieval_ratio = check_ratio("retrieval_ratio", retrieval_ratio, 0.0, 1.0)
        self.sinks = check_int("sinks", sinks, 0)
        self.recent = check_int("recent", recent, 1)
        if retrieval_heads is not None:
            if not isinstance(retrieval_heads, (tuple, list)) or not all(
                    isinstance(hs, (tuple, list)) and all(isinstance(h, int) and h >= 0 for h in hs)
                    for hs in retrieval_heads):
                raise ValueError(f"retrieval_heads must be a tuple (per layer) of tuples of head indices, got "
                                 f"{retrieval_heads!r}")
            retrieval_heads = tuple(tuple(sorted(set(hs))) for hs in retrieval_heads)
        self.retrieval_heads = retrieval_heads
        self.calibration_length = check_int("calibration_length", calibration_length, 2)
        self.calibration_samples = check_int("calibration_samples", calibration_samples, 1)
        self.seed = check_int("seed", seed, 0)
        self.calibrate = retrieval_heads is None
        self._calibrated: dict[int, tuple[list[Tensor], tuple[tuple[int, ...], ...]]] = {}
        self._heads = retrieval_heads

    def prepare(self, model: nn.Module) -> None:
        self._calibrate(model, attention_maps)

    def prepare_hf(self, model: nn.Module) -> None:
        """The scoring pass on a Hugging Face Llama-family model (``mnemos.kv.hf`` calls it when the policy is
        applied): the same scores from the layers' own rotated queries and keys."""
        if self.retrieval_heads is None:
            from mnemos.kv.hf import attention_maps as hf_attention_maps  # transformers only for HF models

            self._calibrate(model, hf_attention_maps)

    def _calibrate(self, model: nn.Module, maps) -> None:
        if self.retrieval_heads is not None:
            return
        key = id(model)
        if key not in self._calibrated:
            length = scoring_length(model, self.calibration_length)
            ids = synthetic_ids(model, length, self.calibration_samples, self.seed)
            scores = [induction_scores(p, length) for p in maps(model, ids)]
            self._calibrated[key] = (scores, choose_retrieval_heads(scores, self.retrieval_ratio))
        self.head_scores, self._heads = self._calibrated[key]

    def heads_of(self, layer_idx: int, n_layers: int, n_heads: int) -> tuple[int, ...]:
        """The retrieval key/value heads of attention layer ``layer_idx``."""
        if self._heads is None:
            raise ValueError("DuoAttention has no retrieval heads yet: apply it to a model (apply_kv_policy / "
                             "`with policy(model)`, which runs the scoring pass) or pass retrieval_heads")
        if len(self._heads) != n_layers:
            raise ValueError(f"retrieval_heads covers {len(self._heads)} layers, the model has {n_layers}")
        heads = self._heads[layer_idx]
        if any(h >= n_heads for h in heads):
            raise ValueError(f"retrieval_heads[{layer_idx}] = {heads} names a head >= the layer's {n_heads}")
        return heads

    def make_cache(self, batch_size, n_heads, head_dim, *, window=None, layer_idx=0, n_layers=1, rope=None,
                   device=None, dtype=None) -> KVCache:
        return HeadSplitCache(self.heads_of(layer_idx, n_layers, n_heads), self.sinks, self.recent, batch_size,
                              n_heads, head_dim, window=window, device=device, dtype=dtype)


class HeadSplitCache(KVCache):
    """One layer's cache with retrieval heads ``retrieval`` kept whole and the other (streaming) heads kept as
    ``sinks`` + ``recent``. Holds ``kr``/``vr`` ``[B, S_r, H_r, D]`` and ``ks``/``vs`` ``[B, S_s, H_s, D]``."""

    def __init__(self, retrieval: tuple[int, ...], sinks: int, recent: int, batch_size: int, n_heads: int,
                 head_dim: int, *, window: int | None = None, device=None, dtype=None) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.head_dim = self.value_dim = check_int("head_dim", head_dim, 1)
        self.retrieval = tuple(retrieval)
        self.streaming = tuple(h for h in range(n_heads) if h not in self.retrieval)
        self.sinks, self.recent, self.layer_window = sinks, recent, window
        dtype = torch.get_default_dtype() if dtype is None else dtype
        b, d = batch_size, head_dim
        self.kr = torch.empty(b, 0, len(self.retrieval), d, device=device, dtype=dtype)
        self.vr = torch.empty(b, 0, len(self.retrieval), d, device=device, dtype=dtype)
        self.ks = torch.empty(b, 0, len(self.streaming), d, device=device, dtype=dtype)
        self.vs = torch.empty(b, 0, len(self.streaming), d, device=device, dtype=dtype)
        self._seen = 0

    # -- introspection -----------------------------------------------------------------------------------------------
    @property
    def window(self) -> int | None:
        return None  # streaming heads hold a gap: the layer masks by position

    @property
    def seen_tokens(self) -> int:
        return self._seen

    @property
    def num_stored(self) -> int:
        """Entries of the longest head (retrieval heads, unless there are none)."""
        return max(self.kr.shape[1], self.ks.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.kr.dtype

    @property
    def device(self) -> torch.device:
        return self.kr.device

    def _retrieval_positions(self, seen: int, n: int) -> Tensor:
        return torch.arange(seen - n, seen, device=self.device)  # [n]: the last n tokens

    def _streaming_positions(self, seen: int, n: int) -> Tensor:
        """The positions a streaming head holds after ``seen`` tokens when it holds ``n``: sinks, then the rest."""
        s = min(self.sinks, n)
        return torch.cat((torch.arange(s, device=self.device), torch.arange(seen - (n - s), seen, device=self.device)))

    def kept_positions(self) -> Tensor:
        """``[B, S, H]``, S = ``num_stored``; a head holding fewer entries is padded with -1 at the front."""
        s = self.num_stored
        out = torch.full((self.batch_size, s, self.n_heads), -1, dtype=torch.int64, device=self.device)
        for heads, n, fn in ((self.retrieval, self.kr.shape[1], self._retrieval_positions),
                             (self.streaming, self.ks.shape[1], self._streaming_positions)):
            if heads:
                out[:, s - n :, list(heads)] = fn(self._seen, n)[None, :, None]
        return out

    # -- the policy --------------------------------------------------------------------------------------------------
    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        view = self.update_view(k_new, v_new)
        return view.keys, view.values

    def update_view(self, k_new: Tensor, v_new: Tensor, q: Tensor | None = None) -> KVView:
        _check_new(self, k_new, v_new)
        b, t, h, d = k_new.shape
        seen = self._seen + t
        r, st = list(self.retrieval), list(self.streaming)
        kr = torch.cat((self.kr, k_new[:, :, r]), dim=1)  # [B, S_r + T, H_r, D]
        vr = torch.cat((self.vr, v_new[:, :, r]), dim=1)
        ks = torch.cat((self.ks, k_new[:, :, st]), dim=1)  # [B, S_s + T, H_s, D]
        vs = torch.cat((self.vs, v_new[:, :, st]), dim=1)
        pr = self._retrieval_positions(seen, kr.shape[1])  # [S_r + T]
        ps = torch.cat((self._streaming_positions(self._seen, self.ks.shape[1]),
                        torch.arange(self._seen, seen, device=self.device)))  # [S_s + T]
        n = max(kr.shape[1], ks.shape[1])
        keys = k_new.new_zeros(b, n, h, d)  # [B, n, H, D]: each side right-aligned (the new tokens last)
        values = v_new.new_zeros(b, n, h, self.value_dim)
        pos = torch.full((b, n, h), _HIDDEN, dtype=torch.int64, device=self.device)
        for heads, k_, v_, p_ in ((r, kr, vr, pr), (st, ks, vs, ps)):
            if heads:
                m = k_.shape[1]
                keys[:, n - m :, heads] = k_
                values[:, n - m :, heads] = v_
                pos[:, n - m :, heads] = p_[None, :, None]
        self._seen = seen
        # what stays: retrieval heads everything (the last W - 1 on a sliding window), streaming heads sinks + recent
        keep_r = kr.shape[1] if self.layer_window is None else min(kr.shape[1], self.layer_window - 1)
        self.kr, self.vr = kr[:, kr.shape[1] - keep_r :].clone(), vr[:, vr.shape[1] - keep_r :].clone()
        m = ks.shape[1]
        if m > self.sinks + self.recent:
            idx = list(range(self.sinks)) + list(range(m - self.recent, m))
            ks, vs = ks[:, idx], vs[:, idx]
        self.ks, self.vs = ks.clone(), vs.clone()
        return KVView(keys, values, pos)

    def reset(self) -> None:
        self.kr, self.vr, self.ks, self.vs = (t[:, :0].clone() for t in (self.kr, self.vr, self.ks, self.vs))
        self._seen = 0

    def to(self, device=None, dtype=None) -> "HeadSplitCache":
        self.kr, self.vr, self.ks, self.vs = (t.to(device=device, dtype=dtype)
                                              for t in (self.kr, self.vr, self.ks, self.vs))
        return self

    # -- serialisation -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"kr": self.kr, "vr": self.vr, "ks": self.ks, "vs": self.vs,
                "seen_tokens": torch.tensor(self._seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        want = {"kr", "vr", "ks", "vs", "seen_tokens"}
        if set(state) != want:
            raise ValueError(f"state must have keys {sorted(want)}, got {sorted(state)}")
        for name, heads in (("kr", self.retrieval), ("vr", self.retrieval), ("ks", self.streaming),
                            ("vs", self.streaming)):
            t = state[name]
            if t.ndim != 4 or t.shape[0] != self.batch_size or t.shape[2:] != (len(heads), self.head_dim):
                raise ValueError(f"state[{name!r}] must be [B={self.batch_size}, S, {len(heads)}, {self.head_dim}], "
                                 f"got {tuple(t.shape)}")
        if state["kr"].shape[1] != state["vr"].shape[1] or state["ks"].shape[1] != state["vs"].shape[1]:
            raise ValueError("state's keys and values hold different numbers of entries")
        if state["ks"].shape[1] > self.sinks + self.recent:
            raise ValueError(f"state['ks'] holds {state['ks'].shape[1]} entries, more than sinks + recent")
        for name in ("kr", "vr", "ks", "vs"):
            setattr(self, name, state[name].to(device=self.device, dtype=self.dtype).clone())
        self._seen = int(state["seen_tokens"])

    def __repr__(self) -> str:
        return (f"HeadSplitCache(retrieval={self.retrieval}, sinks={self.sinks}, recent={self.recent}, "
                f"seen_tokens={self._seen}, stored=({self.kr.shape[1]}, {self.ks.shape[1]}), nbytes={self.nbytes})")
