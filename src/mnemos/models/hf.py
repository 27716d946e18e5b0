"""Hugging Face wrappers: ``MnemosHFConfig`` and ``MnemosForCausalLM`` around :class:`MnemosLM` (transformers >= 5).

Importing this module registers both with ``AutoConfig`` / ``AutoModelForCausalLM`` under ``model_type="mnemos"``.
``transformers`` is an optional dependency: ``mnemos.models`` never imports this module.

- ``MnemosHFConfig`` mirrors :class:`MnemosConfig` field for field (``memory`` is a nested dict of
  :class:`MemoryConfig` fields, ``mamba2``, ``based``, ``mom`` and ``lm2`` dicts of their sections' fields, ``layers`` a
  hybrid stack's list of block variants). It is validated by building a ``MnemosConfig``, so bad values raise that
  class's errors, and keys that are neither mnemos fields nor keys Hugging Face itself writes raise a ``ValueError``
  naming them.
- ``MnemosForCausalLM`` holds one ``MnemosLM`` (``self.model``); state-dict keys are ``model.<MnemosLM key>``.
  ``save_pretrained`` writes safetensors with the tied head dropped, ``from_pretrained`` re-ties it.
- ``generate``: the mnemos :class:`Cache` is the model's past state. ``forward`` returns it as ``cache`` (the name
  transformers 5 uses for ``past_key_values``), generation feeds it back with only the new token, so a step costs
  what a ``MnemosLM`` cached step costs, and decoding memory stays bounded for every variant whose registry entry
  says so (``state_growth``: :mod:`mnemos.models.registry`; all but the transformer).
  The model opts out of transformers' default ``DynamicCache`` (``_supports_default_dynamic_cache``). Beam search
  reorders the cache's streams (``_reorder_cache`` -> :meth:`Cache.reorder`). The model is marked stateful: a
  recurrent state cannot be rolled back to an earlier token, so assisted decoding is not supported.
- Left padding: ``generate(input_ids, attention_mask=...)`` over prompts of different lengths, left-padded (each
  mask row zeros, then ones), continues each prompt exactly as it would alone. ``MnemosLM`` groups the rows by their
  pads and runs each group without them (:meth:`MnemosLM.features`); the cache is then a :class:`PaddedCache` (one
  :class:`Cache` per group; its ``position`` counts the padded columns, which is what ``prepare_inputs_for_generation``
  slices by), reordered group by group in beam search. Cost: one model call per distinct prompt length, at the
  prompt and at every step. Right padding or a hole in a row is a ``ValueError`` naming ``attention_mask``.

Example:
    >>> import mnemos.models.hf  # registers "mnemos"
    >>> from transformers import AutoModelForCausalLM
    >>> cfg = MnemosHFConfig(variant="mag", vocab_size=64, d_model=32, n_layers=2, n_heads=4, window=8)
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> model.generate(torch.zeros(1, 3, dtype=torch.long), do_sample=False, max_new_tokens=4).shape
    torch.Size([1, 7])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedConfig
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import Cache, PaddedCache
from .config import SECTIONS, MemoryConfig, MnemosConfig, saved_model_config
from .lm import MnemosLM

__all__ = ["MnemosHFConfig", "MnemosForCausalLM"]

MNEMOS_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MnemosConfig))

# keys that transformers itself passes to a config's constructor (read from a saved config.json or given to
# ``from_pretrained``) without declaring them as dataclass fields; anything else that is not a field is a typo
_HF_EXTRA_KEYS: frozenset[str] = frozenset(
    {
        "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation",
        "experts_implementation", "_attn_implementation_internal", "_experts_implementation_internal",
        "per_layer_config", "num_labels", "model_type", "transformers_version",
    }
    | set(GenerationConfig._get_default_generation_params())
)


class MnemosHFConfig(PreTrainedConfig):
    """Hugging Face config of a :class:`MnemosLM`: the fields of :class:`MnemosConfig`, same names and defaults.

    ``memory`` is a dict of :class:`MemoryConfig` fields (None: all defaults), ``mamba2``, ``based``, ``mom`` and
    ``lm2`` dicts of their sections' fields (:data:`mnemos.models.config.SECTIONS`); each is stored resolved (every
    key).
    ``layers`` (a hybrid stack's variant per block, with ``variant="hybrid"``) is stored as a list, expanded.
    ``to_mnemos()`` returns the equivalent ``MnemosConfig``. ``tie_word_embeddings`` reads ``tie_embeddings``.
    """

    model_type = "mnemos"
    # the standard names generic transformers code looks up
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "tie_word_embeddings": "tie_embeddings",
    }

    # MnemosConfig, field for field (test_hf.py checks names and defaults against it)
    variant: str = "mac"
    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_hidden: int | None = None
    window: int = 512
    segment_len: int = 512
    num_persistent: int = 4
    mag_gate_bias: float = -2.0
    mal_memory_residual: bool = True
    mac_memory_residual: bool = True
    mac_attn_init_scale: float = 0.0
    rope_base: float = 10000.0
    delta_qk_init: str = "random"
    memory: dict | None = None
    mamba2: dict | None = None
    based: dict | None = None
    mom: dict | None = None
    lm2: dict | None = None
    layers: list | None = None  # a hybrid stack's variant per block (variant "hybrid"); stored expanded
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    # generation plumbing (not read by MnemosLM)
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        unknown = sorted(k for k in kwargs if k not in _HF_EXTRA_KEYS)
        if unknown:
            raise ValueError(
                f"unknown {type(self).__name__} keys {unknown}; mnemos keys: {list(MNEMOS_FIELDS)} "
                f"(memory.* keys: {[f.name for f in dataclasses.fields(MemoryConfig)]})"
            )
        for name in ("memory", *SECTIONS):  # a config section object given instead of its dict
            if dataclasses.is_dataclass(getattr(self, name)):
                setattr(self, name, getattr(self, name).to_dict())
        # validation: MnemosConfig checks every value (and the sections' keys); store the sections with defaults
        # resolved
        resolved = self.to_mnemos()
        for name in ("memory", *SECTIONS):
            setattr(self, name, getattr(resolved, name).to_dict())
        self.layers = resolved.to_dict()["layers"]  # a "..." pattern expanded
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """From a saved ``config.json`` (what ``from_pretrained`` reads): memory keys added since it was written take
        the values that reproduce the saved model (:func:`mnemos.models.saved_model_config`)."""
        return super().from_dict(saved_model_config(config_dict), **kwargs)

    def to_mnemos(self) -> MnemosConfig:
        """The equivalent :class:`MnemosConfig` (raises its errors for invalid values)."""
        d = {name: getattr(self, name) for name in MNEMOS_FIELDS}
        for name in ("memory", *SECTIONS):
            d[name] = dict(d[name] or {})
        return MnemosConfig.from_dict(d)

    @classmethod
    def from_mnemos(cls, config: MnemosConfig, **kwargs) -> "MnemosHFConfig":
        """Wrap a :class:`MnemosConfig` (``kwargs``: Hugging Face extras such as ``eos_token_id``)."""
        if not isinstance(config, MnemosConfig):
            raise TypeError(f"config must be a MnemosConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)


class MnemosForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`MnemosLM` behind the ``PreTrainedModel`` / ``GenerationMixin`` interfaces.

    ``forward(input_ids [B, T], cache=None, ...)`` returns ``CausalLMOutputWithPast(logits [B, T, V], cache)``:
    ``cache`` is a mnemos :class:`Cache` (started when ``use_cache`` is true, which is the config's default), fed
    back with only the tokens that follow it. ``labels`` (``-100`` ignored) give the shifted next-token loss, plus
    the mixers' auxiliary losses (:meth:`MnemosLM.aux_loss`: MoM's load balancing), as ``mnemos train`` trains.
    ``attention_mask`` (``[B, T]``, or ``[B, cache.position + T]`` as generation passes it): left padding only, in
    the first call (:meth:`MnemosLM.features`); the logits at the pads are zeros, the others equal those of each row
    alone, and the cache is a :class:`PaddedCache`. With ``labels``, a label whose predicting position is a pad is
    ignored (as ``-100``), so each row's loss terms are those of the row alone. ``document_ids`` (``[B, T]``
    integers, training: no cache): packed documents, each from a fresh state (:meth:`MnemosLM.features`); with
    ``labels``, each document's first token is not a target.
    """

    config_class = MnemosHFConfig
    config: MnemosHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _no_split_modules = ["Block"]
    _is_stateful = True  # no assisted decoding: a mnemos cache cannot be rolled back
    _supports_cache_class = False

    def __init__(self, config: MnemosHFConfig):
        super().__init__(config)
        self.model = MnemosLM(config.to_mnemos())  # initialises its own weights
        self.post_init()

    @property
    def state_growth(self) -> str:
        """``"growing"`` or ``"constant"``: whether the cache grows with the context (``MnemosLM.state_growth``)."""
        return self.model.state_growth

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: MnemosLM and its layers initialise themselves; the generic Hugging Face init would undo that."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation must not hand us a DynamicCache: the first forward starts a mnemos Cache

    def _reorder_cache(self, cache: Cache | PaddedCache, beam_idx: Tensor) -> Cache | PaddedCache:
        """Beam search: every stream continues the beam it was chosen from (:meth:`Cache.reorder`,
        :meth:`PaddedCache.reorder`)."""
        return cache.reorder(beam_idx)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        cache: Cache | PaddedCache | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | PaddedCache | None = None,
        document_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        if input_ids is None:
            raise ValueError("MnemosForCausalLM needs input_ids (inputs_embeds are not supported)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("MnemosForCausalLM does not support inputs_embeds; pass input_ids")
        if cache is None:
            cache = past_key_values  # the pre-5 name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if document_ids is not None and use_cache and cache is None:
            use_cache = False  # packed documents are a training call: no state to carry
        if cache is None and use_cache:
            cache = self.model.init_cache(input_ids.shape[0], input_ids.device)
        # attention_mask: left padding runs grouped by pads; document_ids: packed documents (MnemosLM.features)
        h, cache = self.model.features(
            input_ids, cache, attention_mask=attention_mask, document_ids=document_ids
        )  # [B, T, d]
        if logits_to_keep:
            h = h[:, -logits_to_keep:]  # generation only needs the last position's logits
        logits = self.model.lm_head(h)  # [B, T or logits_to_keep, V]
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
            targets = labels[:, 1:].to(logits.device)
            if attention_mask is not None:  # a target predicted from a pad is no target (validated left padding)
                targets = targets.masked_fill(attention_mask[:, -input_ids.shape[1] : -1].to(logits.device) == 0, -100)
            if document_ids is not None:  # a document's first token is not predicted from the previous document
                d = document_ids.to(logits.device)
                targets = targets.masked_fill(d[:, 1:] != d[:, :-1], -100)
            scores = logits[:, :-1].flatten(0, 1)  # the loss in float32 at least (upcast half / bf16, keep float64)
            scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
            loss = F.cross_entropy(scores, targets.flatten(), ignore_index=-100)
            aux = self.model.aux_loss()  # MoM's load-balancing loss (None for most variants)
            if aux is not None:
                loss = loss + aux
        if not return_dict:
            out = (logits, cache)
            return (loss, *out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the cache has not seen: all of them at the first step, then the new one."""
        cache = past_key_values if cache is None else cache
        if cache is not None:
            input_ids = input_ids[:, cache.position :]
        elif next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        inputs = {"input_ids": input_ids.contiguous(), "cache": cache, "use_cache": use_cache}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask  # the whole mask: forward checks it against the cache
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


AutoConfig.register(MnemosHFConfig.model_type, MnemosHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MnemosHFConfig, MnemosForCausalLM, exist_ok=True)
