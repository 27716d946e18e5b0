"""mnemos KV policies on Hugging Face Llama-family causal LMs (``LlamaForCausalLM``; Qwen2 and Mistral share the hook).

``PolicyCache(model, policy)`` is a ``transformers`` ``Cache`` whose layers are mnemos policy caches; pass it to
``generate(..., cache=cache)`` (``past_key_values=`` before transformers 5.2x) or to a forward call.
``with policy(model):`` (``hf_kv_policy``) makes ``model.generate`` use a fresh ``PolicyCache`` of that policy whenever
it is not given a cache.

- Heads: the cache holds key/value heads only (``[B, Hkv, S, D]`` as transformers passes them); scores that need
  queries combine each group's query heads (see docs/KV.md). Nothing is expanded to query heads.
- Hooks (``install_hooks``, put on the model by ``PolicyCache``; ``remove_hooks`` takes them off and ``hf_kv_policy``
  does so on exit when it installed them). They do nothing unless the call's cache is a ``PolicyCache``:
  - on the model: a forward pre-hook that switches the model's attention implementation to mnemos' (``mnemos_kv``,
    registered in transformers' ``AttentionInterface``) for that call only, a forward hook (``always_call``) that
    switches it back, and the call's ``input_ids`` handed to the caches that read token ids (SentenceKV);
  - on every attention module: a forward pre-hook that arms the layer's cache for the call and, when the policy
    scores with queries (H2O, SnapKV, PyramidKV, ThinK, InfLLM, SentenceKV), recomputes them (``q_proj`` then RoPE
    with the layer's ``position_embeddings``), as kvpress does when attention weights are absent.
- Positions and masks: keys keep their original RoPE and new tokens their absolute positions (``get_seq_length`` is
  the tokens seen), unless the policy re-rotates (StreamingLLM with ``rerotate=True``, alone or composed): then the
  model pre-hook sets the call's ``position_ids`` to the in-cache positions ``rope_offset .. rope_offset + T - 1``
  (transformers rotates the queries and new keys there, with its own rotary embedding), and after an eviction the
  cache rotates each kept key by Δ = −(entries evicted before it) with the model's own frequencies (its rotary
  embedding's ``inv_freq`` as the forward uses it, float32; channel i with i + D/2 as ``rotate_half``; no attention
  scaling, which the stored key already carries once), as on mnemos models (docs/KV.md, StreamingLLM).
  Each layer's ``update`` returns the policy's view (keys / values padded to one length per layer) and keeps a
  visibility ``[B, Hkv, T, S]``: key entry s of head h is visible to query t when its original position is at most
  the query's (entries padded at an unreachable position never are). mnemos' attention function applies it,
  per key/value head, broadcast over the head's query group (``scaled_dot_product_attention`` on ``[B, Hkv, g·T, D]``
  queries: nothing expanded). So heads of one layer may hold different entries and different numbers of them
  (DuoAttention, SentenceKV, InfLLM with ``per_head``), and layers different lengths (PyramidKV, InfLLM's retrieved
  blocks), in one prefill, a chunked prefill and decoding; transformers' own causal mask is not built for these calls.
- Sliding-window layers (Mistral's ``sliding_window``, Qwen2's ``layer_types``): the layer's policy cache is made with
  that window (as a mnemos SWA layer's: entries that left it are dead, kept only while a policy has room) and the
  visibility adds ``query - key < window`` (transformers' own sliding mask), in original positions.
- Refused: sliding-window layers with a re-rotating policy, padded batches (a 2-D ``attention_mask`` with zeros:
  ``ValueError`` at the call), whatever a policy's ``hf_refusal`` names, and for re-rotating policies: RoPE types
  whose frequencies change with the sequence length (``dynamic``, ``longrope``: a rotation by a position delta would
  not be the model's), partial rotary embeddings, and a call whose ``position_ids`` are not the absolute positions
  ``seen .. seen + T - 1`` (the hook places the tokens itself; ``generate`` passes exactly those).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mnemos.layers.kv_cache import KVCache, KVPolicy

__all__ = ["PolicyCache", "PolicyLayer", "attention_maps", "cache_kwarg", "hf_kv_policy", "install_hooks",
           "install_query_hooks", "remove_hooks", "remove_query_hooks", "ModelRotation", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "mnemos_kv"  # the name of mnemos' attention function in transformers' AttentionInterface
_HOOK_ATTR = "_mnemos_kv_query_hook"  # on attention modules: the pre-hook's handle
_MODEL_HOOK_ATTR = "_mnemos_kv_model_hooks"  # on the model: (pre-hook, hook) handles
_PREV_ATTR = "_mnemos_kv_prev_attn"  # on the model, during a PolicyCache call: the implementation to switch back to
_LAYER_ATTR = "_mnemos_kv_layer"  # on an attention module, during a PolicyCache call: its PolicyLayer


def _config_dims(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a Llama-family config."""
    n_layers = config.num_hidden_layers
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return n_layers, n_kv, head_dim


_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")  # frequencies fixed at init (no dynamic update)


def _rerotates(policy: KVPolicy) -> bool:
    """Whether ``policy`` (or the eviction part of a composition) re-rotates kept keys to in-cache positions."""
    return bool(getattr(policy, "rerotate", False) or getattr(getattr(policy, "eviction", None), "rerotate", False))


class ModelRotation:
    """A Hugging Face model's rotary frequencies, for re-rotating stored keys by a position delta
    (``mnemos.kv.base.rerotate``): the rotary embedding's ``inv_freq`` as its forward uses it (float32), in float64.
    Its ``attention_scaling`` is not applied: the stored keys carry it once already and a delta is a pure rotation."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary

    def rerotation_inv_freq(self, device) -> Tensor:
        return self.rotary.inv_freq.to(device=device, dtype=torch.float32).to(torch.float64)  # [D/2]


def _model_rotation(model: nn.Module, policy: KVPolicy) -> ModelRotation:
    """The model's rotary embedding for a re-rotating policy; ValueError where re-rotation cannot be exact."""
    name = type(policy).__name__
    rot = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), Tensor) and hasattr(m, "rope_type")]
    if len(rot) != 1:
        raise ValueError(f"{name} re-rotates kept keys with the model's rotary embedding, but the model has {len(rot)} "
                         "rotary embedding modules (expected one, as Llama's model.rotary_emb)")
    rope_type = rot[0].rope_type
    if not isinstance(rope_type, str) or rope_type not in _STATIC_ROPE:
        raise ValueError(f"{name} re-rotates kept keys by a position delta, which needs RoPE frequencies fixed for the "
                         f"whole stream; the model's rope_type {rope_type!r} is not one of {_STATIC_ROPE} (dynamic "
                         "and longrope change them with the sequence length): use rerotate=False")
    head_dim = _config_dims(model.config)[2]
    if 2 * rot[0].inv_freq.numel() != head_dim:
        raise ValueError(f"{name} re-rotates whole key heads, but the model's rotary embedding covers "
                         f"{2 * rot[0].inv_freq.numel()} of {head_dim} channels (partial rotary): use rerotate=False")
    return ModelRotation(rot[0])


def _check(model: nn.Module, policy: KVPolicy) -> None:
    if not isinstance(policy, KVPolicy):
        raise ValueError(f"policy must be a KVPolicy (mnemos.kv), got {type(policy).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers") or not hasattr(config, "num_attention_heads"):
        raise ValueError(f"model must be a Hugging Face Llama-family causal LM, got {type(model).__name__}")
    if _rerotates(policy):
        _model_rotation(model, policy)
    if _rerotates(policy) and any(layer_window(config, i) is not None for i in range(_config_dims(config)[0])):
        raise ValueError(f"model uses sliding-window attention (sliding_window={config.sliding_window}), which a "
                         "re-rotating policy does not support (the window counts original positions, the rotation "
                         "in-cache ones): use rerotate=False")
    refusal = policy.hf_refusal() if hasattr(policy, "hf_refusal") else None
    if refusal:
        raise ValueError(refusal)
    check_head_dim = getattr(policy, "check_head_dim", None)
    if check_head_dim is not None:
        check_head_dim(_config_dims(config)[2])
    check_n_layers = getattr(policy, "check_n_layers", None)  # policies over several layers (MiniCache's pairs)
    if check_n_layers is not None:
        check_n_layers(_config_dims(config)[0])
    prepare_hf = getattr(policy, "prepare_hf", None)  # a scoring pass on the model (DuoAttention's heads)
    if prepare_hf is not None:
        prepare_hf(model)


def layer_window(config, layer_idx: int) -> int | None:
    """The sliding window of decoder layer ``layer_idx`` of a Hugging Face config, None for full attention:
    ``config.sliding_window`` where ``config.layer_types`` says ``"sliding_attention"`` (Qwen2 and newer configs), or
    on every layer when the config has no layer types and does not switch it off (``use_sliding_window``: Mistral)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer_idx] == "sliding_attention" else None
    return window if getattr(config, "use_sliding_window", True) else None


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's cache: a mnemos policy cache (``self.cache``), made at the first update; ``window``: the
    layer's sliding window (None: full attention)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: KVPolicy, layer_idx: int, n_layers: int, rope: ModelRotation | None = None,
                 window: int | None = None) -> None:
        super().__init__()
        self.policy, self.layer_idx, self.n_layers, self.window = policy, layer_idx, n_layers, window
        self.rope = rope  # a re-rotating policy's frequencies (the model's rotary embedding), else None
        self.cache: KVCache | None = None
        self.pending_q: Tensor | None = None  # [B, T, Hq, D], set by the attention hook before update
        self.pending_ids: Tensor | None = None  # [B, T] token ids of the call, set by the model hook
        self.armed = False  # set by the attention hook: the call runs through mnemos' attention function
        self.visible: Tensor | str | None = None  # set by update, read by the attention function (_visibility)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.cache = self.policy.make_cache(b, h, d, window=self.window, layer_idx=self.layer_idx,
                                            n_layers=self.n_layers, rope=self.rope, device=key_states.device,
                                            dtype=key_states.dtype)
        self.device = key_states.device
        self.batch_size = b
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """``[B, Hkv, T, D]`` new keys/values -> what the new queries see, ``[B, Hkv, S, D]`` (the policy's view:
        stored entries and the new ones, padded to one length), and the view's visibility for the attention
        function (``self.visible``)."""
        if not self.armed:
            raise ValueError("a PolicyCache layer was updated outside the model's mnemos hooks: call the model the "
                             "cache was made for (PolicyCache installs its hooks; remove_hooks or the end of a "
                             "`with policy(model)` block takes them off)")
        self.armed = False
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q, self.pending_q = self.pending_q, None
        ids, self.pending_ids = self.pending_ids, None
        if ids is not None and hasattr(self.cache, "set_token_ids"):
            self.cache.set_token_ids(ids)
        view = self.cache.update_view(key_states.transpose(1, 2), value_states.transpose(1, 2), q=q)
        self.visible = _visibility(view.positions, self.cache.seen_tokens, key_states.shape[2], view.keys.shape[1],
                                   key_states.device, self.window)
        return view.keys.transpose(1, 2), view.values.transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # not used for PolicyCache calls (mnemos' attention function builds its own visibility); kept consistent
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
        new = self.policy.make_cache(b, self.cache.n_heads, self.cache.head_dim, window=self.window,
                                     layer_idx=self.layer_idx, n_layers=self.n_layers, rope=self.rope,
                                     device=self.device, dtype=self.cache.dtype)
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
        model: the Hugging Face causal LM (its config gives the layers; mnemos' hooks are installed on it).
        policy: a ``mnemos.kv`` policy.
    """

    def __init__(self, model: nn.Module, policy: KVPolicy) -> None:
        _check(model, policy)
        n_layers = _config_dims(model.config)[0]
        self.rotation = _model_rotation(model, policy) if _rerotates(policy) else None
        super().__init__(layers=[PolicyLayer(policy, i, n_layers, self.rotation, layer_window(model.config, i))
                                 for i in range(n_layers)])
        self.policy = policy
        self.needs_queries = bool(getattr(policy, "needs_queries", False))
        self.needs_token_ids = bool(getattr(policy, "needs_token_ids", False))
        install_hooks(model)

    @property
    def nbytes(self) -> int:
        """Bytes the layers' caches hold (packed tensors, indices and positions included)."""
        return sum(layer.cache.nbytes for layer in self.layers if layer.is_initialized)

    def tier_nbytes(self) -> dict[str, int]:
        """``{"resident": ..., "offloaded": ...}`` over the layers (the retrieval tier's store is offloaded)."""
        out = {"resident": 0, "offloaded": 0}
        for layer in self.layers:
            if layer.is_initialized:
                for k, v in layer.cache.tier_nbytes().items():
                    out[k] = out.get(k, 0) + v
        return out

    def kept_positions(self, layer_idx: int) -> Tensor:
        """``[B, S, Hkv]`` original positions kept by layer ``layer_idx``."""
        return self.layers[layer_idx].cache.kept_positions()


# ----------------------------------------------------------------------------------------------------------------------
# mnemos' attention function


def _visibility(positions: Tensor | None, seen: int, t: int, s: int, device, window: int | None = None
                ) -> Tensor | str:
    """Which of a view's S entries each of the call's T queries (at ``seen - T .. seen - 1``) sees: key entry s of
    head h when its original position is at most the query's (an entry padded at an unreachable position never) and,
    in a sliding-window layer, less than ``window`` before it.

    ``"causal"`` when the view is exactly the T new tokens and no window cuts it (no mask: sdpa's causal kernel);
    ``[1, 1, T, S]`` when every row and head holds the same positions (one mask for all heads); else
    ``[B, Hkv, T, S]``."""
    q_pos = torch.arange(seen - t, seen, device=device)  # [T]
    causal_ok = window is None or window >= t
    if positions is None:  # a contiguous run ending at the new tokens
        if s == t and causal_ok:
            return "causal"
        k_pos = torch.arange(seen - s, seen, device=device)[None, None, None, :]  # [1, 1, 1, S]
    else:
        positions = positions.to(device)
        first = positions[:1, :, :1]  # [1, S, 1]
        if bool((positions == first).all()):  # the same positions in every row and head
            if s == t and causal_ok and bool((first[0, :, 0] == q_pos).all()):
                return "causal"
            k_pos = first.permute(0, 2, 1)[:, :, None, :]  # [1, 1, 1, S]
        else:
            k_pos = positions.permute(0, 2, 1)[:, :, None, :]  # [B, Hkv, 1, S]
    q_pos = q_pos[None, None, :, None]
    visible = k_pos <= q_pos
    return visible if window is None else visible & (q_pos - k_pos < window)


def _policy_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """Attention over a PolicyCache layer's view with its visibility: ``query`` ``[B, Hq, T, D]``, ``key`` /
    ``value`` ``[B, Hkv, S, D]`` (never expanded: the g query heads of a key/value head are stacked along the query
    axis); returns ``[B, T, Hq, Dv]``."""
    layer = getattr(module, _LAYER_ATTR, None)
    setattr(module, _LAYER_ATTR, None)
    visible = None if layer is None else layer.visible
    if layer is not None:
        layer.visible = None
    if visible is None:
        raise RuntimeError("mnemos' attention function ran without a PolicyCache layer's visibility (the "
                           f"'{ATTN_IMPLEMENTATION}' implementation is switched on only for PolicyCache calls)")
    b, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = hq // hkv
    sdpa = nn.functional.scaled_dot_product_attention
    if isinstance(visible, str):  # the view is the call's own tokens: plain causal attention, GQA in the kernel
        out = sdpa(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=g > 1)
        return out.transpose(1, 2).contiguous(), None
    # each key/value head's g query heads stacked along the query axis, its mask repeated over them
    q = query.reshape(b, hkv, g * t, d)  # query head h = kv head h // g, member h % g
    vb, vh = visible.shape[:2]  # [1, 1] (one mask for every row and head) or [B, Hkv]
    mask = visible[:, :, None].expand(vb, vh, g, t, s).reshape(vb, vh, g * t, s)
    out = sdpa(q, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout)  # [B, Hkv, g * T, Dv]
    return out.reshape(b, hq, t, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _policy_attention)


# ----------------------------------------------------------------------------------------------------------------------
# hooks


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if not mods:
        raise ValueError(f"model ({type(model).__name__}) has no Llama-style attention module (q_proj, layer_idx)")
    return mods


def _attention_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, PolicyCache):
        setattr(module, _LAYER_ATTR, None)
        return
    if module.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError("a PolicyCache must be used through the model it was made for (its forward hook switches "
                         f"the attention implementation to '{ATTN_IMPLEMENTATION}' for the call); got "
                         f"'{module.config._attn_implementation}'")
    layer = cache.layers[module.layer_idx]
    layer.armed = True
    setattr(module, _LAYER_ATTR, layer)
    if not cache.needs_queries:
        return
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
    q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)  # [B, Hq, T, D]
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    layer.pending_q = q.transpose(1, 2)  # [B, T, Hq, D]


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return kwargs
    return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments


def _set_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with argument ``name`` set to ``value`` (where the caller put it)."""
    params = [n for n in inspect.signature(module.forward).parameters if n != "self"]
    i = params.index(name) if name in params else len(args)
    if i < len(args):
        return args[:i] + (value,) + args[i + 1 :], kwargs
    return args, {**kwargs, name: value}


def _in_cache_positions(module: nn.Module, args: tuple, kwargs: dict, call: dict,
                        cache: "PolicyCache") -> tuple[tuple, dict]:
    """A re-rotating policy's call: ``position_ids`` set to the in-cache positions ``rope_offset .. + T - 1`` (what
    mnemos' attention rotates new tokens at), after checking that the caller gave none but the absolute ones."""
    x = call.get("input_ids")
    x = call.get("inputs_embeds") if x is None else x
    if not isinstance(x, Tensor):
        return args, kwargs  # the model raises its own error
    t = x.shape[1]
    seen = cache.get_seq_length()
    offsets = {layer.cache.rope_offset for layer in cache.layers if layer.is_initialized}
    if len(offsets) > 1:
        raise ValueError(f"{type(cache.policy).__name__} re-rotates keys, but the layers' in-cache positions differ "
                         f"({sorted(offsets)}): one position_ids serves every layer of a Hugging Face model")
    offset = offsets.pop() if offsets else seen
    given = call.get("position_ids")
    if given is not None:
        absolute = torch.arange(seen, seen + t, device=x.device)
        ok = isinstance(given, Tensor) and given.ndim in (1, 2) and given.shape[-1] == t and \
            bool((given.to(x.device) == absolute).all())
        if not ok:
            raise ValueError(f"position_ids: {type(cache.policy).__name__} re-rotates kept keys to in-cache positions "
                             "and places each call's tokens at the next in-cache position itself; only the absolute "
                             f"positions {seen} .. {seen + t - 1} (what generate passes) may be given, got "
                             f"{given.tolist() if isinstance(given, Tensor) and given.numel() <= 16 else 'others'}")
    return _set_argument(module, args, kwargs, "position_ids", torch.arange(offset, offset + t, device=x.device)[None])


def _model_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    call = _call_arguments(module, args, kwargs)
    cache = call.get("cache", call.get("past_key_values"))
    if not isinstance(cache, PolicyCache):
        return None
    mask = call.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and not bool(mask.bool().all()):
        raise ValueError("attention_mask pads some rows: a PolicyCache takes rows of equal length (no padding)")
    if cache.rotation is not None:
        args, kwargs = _in_cache_positions(module, args, kwargs, call, cache)
    if cache.needs_token_ids:
        ids = call.get("input_ids")
        if not isinstance(ids, Tensor):
            raise ValueError(f"{type(cache.policy).__name__} reads token ids: call the model with input_ids (not "
                             "inputs_embeds)")
        for layer in cache.layers:
            layer.pending_ids = ids
    config = module.config
    if config._attn_implementation != ATTN_IMPLEMENTATION:
        setattr(module, _PREV_ATTR, config._attn_implementation)
        config._attn_implementation = ATTN_IMPLEMENTATION
    return args, kwargs


def _model_hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    prev = module.__dict__.pop(_PREV_ATTR, None)
    if prev is not None:
        module.config._attn_implementation = prev


def install_hooks(model: nn.Module) -> None:
    """Put mnemos' hooks on ``model`` and its attention modules (once; idempotent). They act only on calls whose
    cache is a ``PolicyCache``."""
    for m in _attention_modules(model):
        if getattr(m, _HOOK_ATTR, None) is None:
            setattr(m, _HOOK_ATTR, m.register_forward_pre_hook(_attention_hook, with_kwargs=True))
    if getattr(model, _MODEL_HOOK_ATTR, None) is None:
        setattr(model, _MODEL_HOOK_ATTR, (model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True),
                                          model.register_forward_hook(_model_hook, with_kwargs=True,
                                                                      always_call=True)))


def remove_hooks(model: nn.Module) -> None:
    """Take mnemos' hooks off again."""
    for m in model.modules():
        handle = getattr(m, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            setattr(m, _HOOK_ATTR, None)
        handles = getattr(m, _MODEL_HOOK_ATTR, None)
        if handles is not None:
            for h in handles:
                h.remove()
            setattr(m, _MODEL_HOOK_ATTR, None)


install_query_hooks = install_hooks  # the names of an earlier version
remove_query_hooks = remove_hooks


def _has_hooks(model: nn.Module) -> bool:
    return any(getattr(m, _HOOK_ATTR, None) is not None or getattr(m, _MODEL_HOOK_ATTR, None) is not None
               for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------------
# a scoring pass (DuoAttention's heads)


@torch.no_grad()
def attention_maps(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """Each attention layer's float32 probabilities on ``ids`` ``[B, T]`` (one call, no cache), in layer order:
    ``[B, Hkv, g, T, T]`` (causal softmax of the layer's rotated queries and keys, scale ``module.scaling``; query
    head h reads key/value head h // g), as ``mnemos.kv.calibrate.attention_maps`` gives for mnemos models."""
    mods = sorted(_attention_modules(model), key=lambda m: m.layer_idx)
    maps: dict[int, Tensor] = {}

    def grab(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)  # [B, Hq, T, D]
        k = module.k_proj(hidden).view(shape).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        scale = getattr(module, "scaling", None) or 1.0 / math.sqrt(d)
        s = torch.einsum("bhgtd,bhsd->bhgts", q.float().reshape(b, hkv, hq // hkv, t, d), k.float()) * scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        maps[module.layer_idx] = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [maps[m.layer_idx] for m in mods]


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version passes a cache: ``cache`` (from 5.2x on), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def hf_kv_policy(model: nn.Module, policy: KVPolicy) -> Iterator[nn.Module]:
    """``with hf_kv_policy(model, policy):`` (or ``with policy(model):``): ``model.generate`` uses a fresh
    ``PolicyCache`` of ``policy`` unless given a cache; the model's own ``generate`` and hooks come back on exit (the
    attention implementation is switched only during PolicyCache calls, so it is the model's own outside them)."""
    _check(model, policy)
    had_hooks = _has_hooks(model)
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
            remove_hooks(model)
