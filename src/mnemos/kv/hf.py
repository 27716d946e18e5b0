"""mnemos KV policies on Hugging Face Llama-family causal LMs (``LlamaForCausalLM``; Qwen2 and Mistral share the hook).

``PolicyCache(model, policy)`` is a ``transformers`` ``Cache`` whose layers are mnemos policy caches; pass it to
``generate(..., past_key_values=cache)`` or to a forward call. ``with policy(model):`` (``hf_kv_policy``) makes
``model.generate`` use a fresh ``PolicyCache`` of that policy whenever it is not given a cache.

- Heads: the cache holds key/value heads only (``[B, Hkv, S, D]`` as transformers passes them); scores that need
  queries combine each group's query heads (see docs/KV.md). Nothing is expanded to query heads.
- Queries: transformers does not hand the queries to the cache, so a forward pre-hook on every attention module
  recomputes them (``q_proj`` then RoPE with the layer's ``position_embeddings``) when the call's cache is a
  ``PolicyCache`` whose policy scores with queries (H2O, SnapKV, PyramidKV, ThinK), as kvpress does when attention
  weights are absent. The hooks do nothing for other caches; ``remove_query_hooks`` takes them off.
- Positions: keys keep their original RoPE and new tokens their absolute positions (``get_seq_length`` is the tokens
  seen). Every stored entry precedes the new tokens, so the mask only needs causality among the new ones: each layer
  reports ``(stored + new, seen - stored)`` as its mask sizes, i.e. the stored entries at the virtual positions just
  before the new tokens. Re-rotating policies are refused, as are padded batches (a padding mask is indexed by those
  virtual positions) and sliding-window configs.
- Per-layer budgets (PyramidKV): transformers builds one mask for all layers, so layers of different lengths work
  where it builds none (sdpa: a prompt in one call, then one token per step) and fail in a chunked prefill.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mnemos.layers.kv_cache import KVCache, KVPolicy

__all__ = ["PolicyCache", "PolicyLayer", "cache_kwarg", "hf_kv_policy", "install_query_hooks", "remove_query_hooks"]

_HOOK_ATTR = "_mnemos_kv_query_hook"


def _config_dims(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a Llama-family config."""
    n_layers = config.num_hidden_layers
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return n_layers, n_kv, head_dim


def _check(model: nn.Module, policy: KVPolicy) -> None:
    if not isinstance(policy, KVPolicy):
        raise ValueError(f"policy must be a KVPolicy (mnemos.kv), got {type(policy).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers") or not hasattr(config, "num_attention_heads"):
        raise ValueError(f"model must be a Hugging Face Llama-family causal LM, got {type(model).__name__}")
    if getattr(policy, "rerotate", False):
        raise ValueError("policy re-rotates keys to in-cache positions, which the Hugging Face hook does not support "
                         "(transformers rotates queries at absolute positions)")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise ValueError(f"model uses sliding-window attention (sliding_window={config.sliding_window}), which the "
                         "Hugging Face hook does not support")
    refusal = policy.hf_refusal() if hasattr(policy, "hf_refusal") else None
    if refusal:
        raise ValueError(refusal)
    check_head_dim = getattr(policy, "check_head_dim", None)
    if check_head_dim is not None:
        check_head_dim(_config_dims(config)[2])
    check_n_layers = getattr(policy, "check_n_layers", None)  # policies over several layers (MiniCache's pairs)
    if check_n_layers is not None:
        check_n_layers(_config_dims(config)[0])


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's cache: a mnemos policy cache (``self.cache``), made at the first update."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: KVPolicy, layer_idx: int, n_layers: int) -> None:
        super().__init__()
        self.policy, self.layer_idx, self.n_layers = policy, layer_idx, n_layers
        self.cache: KVCache | None = None
        self.pending_q: Tensor | None = None  # [B, T, Hq, D], set by the query hook before update

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.cache = self.policy.make_cache(b, h, d, window=None, layer_idx=self.layer_idx, n_layers=self.n_layers,
                                            rope=None, device=key_states.device, dtype=key_states.dtype)
        self.device = key_states.device
        self.batch_size = b
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """``[B, Hkv, T, D]`` new keys/values -> what the new queries see, ``[B, Hkv, S + T, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q, self.pending_q = self.pending_q, None
        view = self.cache.update_view(key_states.transpose(1, 2), value_states.transpose(1, 2), q=q)
        return view.keys.transpose(1, 2), view.values.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.cache.num_stored if self.is_initialized else 0
        return stored + query_length, self.get_seq_length() - stored

    def get_seq_length(self) -> int:
        return self.cache.seen_tokens if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.cache.reset()

    def _rebuild(self, pick) -> None:
        """A cache of the picked batch rows (``pick``: a function of a batch-first tensor)."""
        if not self.is_initialized:
            return
        state = {k: pick(v) if v.ndim else v for k, v in self.cache.state_dict().items()}
        b = next(v.shape[0] for v in state.values() if v.ndim)
        new = self.policy.make_cache(b, self.cache.n_heads, self.cache.head_dim, window=None,
                                     layer_idx=self.layer_idx, n_layers=self.n_layers, rope=None, device=self.device,
                                     dtype=self.cache.dtype)
        new.load_state_dict(state)
        self.cache, self.batch_size = new, b

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._rebuild(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a PolicyCache cannot be cropped (evicted entries cannot be restored)")

    def offload(self):
        raise ValueError("a PolicyCache cannot be offloaded")


class PolicyCache(Cache):
    """A ``transformers`` cache whose layers follow a mnemos policy (see the module docstring).

    Args:
        model: the Hugging Face causal LM (its config gives the layers; query hooks are installed on it when the
            policy scores with queries).
        policy: a ``mnemos.kv`` policy.
    """

    def __init__(self, model: nn.Module, policy: KVPolicy) -> None:
        _check(model, policy)
        n_layers = _config_dims(model.config)[0]
        super().__init__(layers=[PolicyLayer(policy, i, n_layers) for i in range(n_layers)])
        self.policy = policy
        self.needs_queries = bool(getattr(policy, "needs_queries", False))
        if self.needs_queries:
            install_query_hooks(model)

    @property
    def nbytes(self) -> int:
        """Bytes the layers' caches hold (packed tensors, indices and positions included)."""
        return sum(layer.cache.nbytes for layer in self.layers if layer.is_initialized)

    def kept_positions(self, layer_idx: int) -> Tensor:
        """``[B, S, Hkv]`` original positions kept by layer ``layer_idx``."""
        return self.layers[layer_idx].cache.kept_positions()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if not mods:
        raise ValueError(f"model ({type(model).__name__}) has no Llama-style attention module (q_proj, layer_idx)")
    return mods


def _query_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, PolicyCache) or not cache.needs_queries:
        return
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
    q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)  # [B, Hq, T, D]
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    cache.layers[module.layer_idx].pending_q = q.transpose(1, 2)  # [B, T, Hq, D]


def install_query_hooks(model: nn.Module) -> None:
    """Put the query hook on every attention module of ``model`` (once; idempotent)."""
    for m in _attention_modules(model):
        if getattr(m, _HOOK_ATTR, None) is None:
            setattr(m, _HOOK_ATTR, m.register_forward_pre_hook(_query_hook, with_kwargs=True))


def remove_query_hooks(model: nn.Module) -> None:
    """Take the query hooks off again."""
    for m in model.modules():
        handle = getattr(m, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            setattr(m, _HOOK_ATTR, None)


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version passes a cache: ``cache`` (from 5.2x on), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def hf_kv_policy(model: nn.Module, policy: KVPolicy) -> Iterator[nn.Module]:
    """``with hf_kv_policy(model, policy):`` (or ``with policy(model):``): ``model.generate`` uses a fresh
    ``PolicyCache`` of ``policy`` unless given a cache; the model's own ``generate`` and hooks come back on exit."""
    _check(model, policy)
    had_hooks = any(getattr(m, _HOOK_ATTR, None) is not None for m in model.modules())
    original = model.__dict__.get("generate")
    bound = model.generate

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            kwargs[cache_kwarg(model)] = PolicyCache(model, policy)
        return bound(*args, **kwargs)

    model.generate = generate
    try:
        yield model
    finally:
        if original is None:
            del model.generate
        else:
            model.generate = original
        if not had_hooks:
            remove_query_hooks(model)
