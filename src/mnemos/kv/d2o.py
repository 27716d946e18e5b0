"""D2O: dynamic discriminative operations (Wan et al. 2024, arXiv 2406.13035, ICLR 2025; sec. 3).

Two levels:

- **Layers.** Shallow layers attend densely, deep ones sparsely, so a uniform budget evicts too much where attention
  is spread. D2O gives each layer a budget from the density of its attention. Here: a scoring pass on synthetic
  data (``mnemos.kv.calibrate``: random tokens, repeated) measures each layer's attention variance v_l
  (``layer_variances``: 0 for uniform attention); layer l gets weight ``1 / (1 + v_l)`` (denser, more), and the
  budgets are the global budget times L times the normalised weights, rounded by largest remainder, so their mean is
  the global budget (``layer_budgets``).
- **Tokens.** H2O's eviction (accumulated attention + a recent window) with a *compensation*: each evicted entry
  finds its most similar kept entry (cosine similarity of keys, same row and key/value head); when that similarity
  reaches a threshold tau it is merged into it: ``k_c <- (e k_c + sum_e exp(u_e) k_e) / (e + sum_e exp(u_e))`` (the
  kept entry weighs ``exp(1)``, its similarity to itself), the same for values. tau is an exponential moving average,
  per row and head, of the mean best similarity of the evicted entries: ``tau <- beta tau + (1 - beta) mean_e u_e``
  (the first eviction sets it to that mean), updated before it is applied.

The formulas for the layer weights and the EMA are readings of the paper's description (its code was not checked):
docs/KV.md says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnemos.kv.base import EvictionContext, check_int, check_ratio, resolve_budget
from mnemos.kv.calibrate import attention_maps, layer_variances, scoring_length, synthetic_ids
from mnemos.kv.eviction import H2O

__all__ = ["D2O", "layer_budgets", "merge_evicted"]


def layer_budgets(total: int, weights: tuple[float, ...]) -> list[int]:
    """Per-layer budgets with mean exactly ``total``: ``total * L * w_l / sum(w)`` rounded by largest remainder,
    each at least 1 (what a layer lacks for that is taken from the largest)."""
    n = len(weights)
    real = [total * n * w / sum(weights) for w in weights]
    ints = [max(1, math.floor(x + 1e-9)) for x in real]
    short = n * total - sum(ints)
    order = sorted(range(n), key=lambda i: (-(real[i] - math.floor(real[i] + 1e-9)), i))
    for i in order[: max(short, 0)]:
        ints[i] += 1
    while sum(ints) > n * total:  # the floor of 1 overshot: take back from the largest
        ints[max(range(n), key=lambda i: ints[i])] -= 1
    return ints


def merge_evicted(keys: Tensor, values: Tensor, idx: Tensor, live: Tensor | None, threshold: Tensor,
                  beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """D2O's compensation for one call: ``keys`` ``[B, S, H, D]`` / ``values`` ``[B, S, H, Dv]`` the visible entries,
    ``idx`` ``[B, K, H]`` the kept ones, ``live`` ``[B, S, H]`` (None: all; entries that left a sliding window are
    never merged), ``threshold`` ``[B, H]`` (NaN: not set yet). Returns the kept keys ``[B, K, H, D]`` and values
    after merging, and the updated threshold."""
    b, s, h, d = keys.shape
    kept_k = keys.gather(1, idx[..., None].expand(*idx.shape, d))  # [B, K, H, D]
    kept_v = values.gather(1, idx[..., None].expand(*idx.shape, values.shape[-1]))
    evicted = torch.ones(b, s, h, dtype=torch.bool, device=keys.device).scatter(1, idx, False)  # [B, S, H]
    if live is not None:
        evicted = evicted & live
    kn = F.normalize(keys.float(), dim=-1)
    sim = torch.einsum("bshd,bkhd->bhsk", kn, F.normalize(kept_k.float(), dim=-1))  # [B, H, S, K]
    best, target = sim.max(dim=-1)  # [B, H, S]
    ev = evicted.permute(0, 2, 1)  # [B, H, S]
    n_ev = ev.sum(dim=-1)  # [B, H]
    mean = torch.where(n_ev > 0, (best * ev).sum(dim=-1) / n_ev.clamp(min=1), torch.nan)
    tau = torch.where(torch.isnan(threshold), mean, torch.where(torch.isnan(mean), threshold,
                                                                beta * threshold + (1 - beta) * mean))
    merge = ev & (best >= tau[..., None])  # [B, H, S]
    w = torch.where(merge, best.exp(), torch.zeros_like(best))  # [B, H, S]
    tgt = target.permute(0, 2, 1)  # [B, S, H]: the kept entry each visible entry is closest to
    wt = w.permute(0, 2, 1)  # [B, S, H]
    denom = torch.full(idx.shape, math.e, dtype=torch.float32, device=keys.device)  # [B, K, H]: the kept one's own
    denom = denom.scatter_add(1, tgt, wt)

    touched = denom > math.e  # [B, K, H]: kept entries that absorbed at least one evicted entry

    def blend(kept: Tensor, src: Tensor) -> Tensor:
        ct = torch.promote_types(kept.dtype, torch.float32)
        acc = kept.to(ct) * math.e
        acc = acc.scatter_add(1, tgt[..., None].expand(*tgt.shape, src.shape[-1]), src.to(ct) * wt[..., None].to(ct))
        merged = (acc / denom[..., None].to(ct)).to(kept.dtype)
        return torch.where(touched[..., None], merged, kept)  # the others stay bit-identical

    return blend(kept_k, keys), blend(kept_v, values), tau


class D2O(H2O):
    """H2O's eviction with D2O's per-layer budgets and merging of evicted entries (the module docstring).

    Args:
        budget, recent: as H2O (the budget is the mean over the attention layers).
        beta: the EMA factor of the merge threshold; default 0.5.
        calibrate: measure the layer budgets on the model with a scoring pass when the policy is applied
            (``apply_kv_policy``; once per model object); False: equal budgets. layer_weights: explicit weights
            instead (one per attention layer).
        calibration_length, calibration_samples, seed: the synthetic data of the scoring pass (``samples`` rows of
            ``length`` random tokens, repeated).
    """

    def __init__(self, budget: int | float = 0.2, *, recent: int | float = 0.5, beta: float = 0.5,
                 calibrate: bool = True, layer_weights: tuple[float, ...] | None = None, calibration_length: int = 32,
                 calibration_samples: int = 4, seed: int = 0) -> None:
        super().__init__(budget, recent=recent)
        self.beta = check_ratio("beta", beta, 0.0, 1.0)
        if not isinstance(calibrate, bool):
            raise ValueError(f"calibrate must be a bool, got {calibrate!r}")
        if layer_weights is not None:
            if not isinstance(layer_weights, (tuple, list)) or not layer_weights or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in layer_weights):
                raise ValueError(f"layer_weights must be a non-empty tuple of positive numbers, got {layer_weights!r}")
            layer_weights = tuple(float(w) for w in layer_weights)
        self.calibrate, self.layer_weights = calibrate and layer_weights is None, layer_weights
        self.calibration_length = check_int("calibration_length", calibration_length, 2)
        self.calibration_samples = check_int("calibration_samples", calibration_samples, 1)
        self.seed = check_int("seed", seed, 0)
        self._calibrated: dict[int, tuple[float, ...]] = {}  # id(model) -> weights

    def prepare(self, model: nn.Module) -> None:
        self._calibrate(model, attention_maps)

    def prepare_hf(self, model: nn.Module) -> None:
        """The calibration pass on a Hugging Face Llama-family model (``mnemos.kv.hf`` calls it when the policy is
        applied): the same layer variances from the layers' own attention maps."""
        from mnemos.kv.hf import attention_maps as hf_attention_maps  # transformers only for HF models

        self._calibrate(model, hf_attention_maps)

    def _calibrate(self, model: nn.Module, maps) -> None:
        if not self.calibrate:
            return
        key = id(model)
        if key not in self._calibrated:
            ids = synthetic_ids(model, scoring_length(model, self.calibration_length), self.calibration_samples,
                                self.seed)
            self._calibrated[key] = tuple(1.0 / (1.0 + layer_variances(p)) for p in maps(model, ids))
        self._weights = self._calibrated[key]

    def weights(self, n_layers: int) -> tuple[float, ...]:
        """The layer weights in use: explicit, calibrated (the last model ``prepare`` saw) or equal."""
        w = self.layer_weights or (getattr(self, "_weights", None) if self.calibrate else None)
        if w is None:
            return (1.0,) * n_layers
        if len(w) != n_layers:
            raise ValueError(f"layer_weights has {len(w)} entries, the model has {n_layers} attention layers")
        return w

    def target(self, seen: int, layer_idx: int, n_layers: int, entry_bytes: int = 1) -> int:
        total = resolve_budget(self.budget, seen, entry_bytes)
        return layer_budgets(total, self.weights(n_layers))[layer_idx]

    def cache_state(self, batch_size, n_heads, head_dim, device, dtype) -> dict[str, Tensor]:
        return {"threshold": torch.full((batch_size, n_heads), float("nan"), device=device)}  # [B, H], float32

    def merge(self, ctx: EvictionContext, idx: Tensor) -> tuple[Tensor, Tensor]:
        live = None
        if ctx.window is not None:
            seen = int(ctx.q_positions[-1]) + 1
            live = ctx.positions > seen - ctx.window
        k, v, tau = merge_evicted(ctx.keys, ctx.values, idx, live, ctx.extra["threshold"], self.beta)
        ctx.extra["threshold"] = tau
        return k, v
