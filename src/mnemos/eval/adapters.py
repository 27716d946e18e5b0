"""Adapters that give the harness a :class:`~mnemos.eval.stateful.StatefulLM` from mnemos and Hugging Face models.

- :class:`MnemosLMAdapter` wraps any object with ``MnemosLM``'s signature: ``forward(input_ids, cache=None) ->
  (logits, cache)`` and ``init_cache(batch, device, dtype)``.
- :class:`HFCausalLMAdapter` wraps a Hugging Face causal LM, streaming through ``past_key_values``;
  ``transformers`` is optional and imported only when a model is loaded from a local path.
- :func:`load_model` turns a command-line spec (a checkpoint path, a Hugging Face directory, a mnemos variant name
  or ``baseline:<name>``) into a :class:`StatefulLM`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from torch import Tensor

from mnemos.checkpoint import load_model_weights, read_trainer_state
from mnemos.data.tokenizer import Tokenizer
from mnemos.eval.reference_models import make_baseline
from mnemos.eval.stateful import StateGrowth, StatefulLM
from mnemos.models import MnemosConfig, MnemosLM, saved_model_config
from mnemos.models.config import merge_overrides
from mnemos.models.registry import HYBRID, VARIANT_REGISTRY

__all__ = [
    "HFCausalLMAdapter",
    "MnemosLMAdapter",
    "build_mnemos_model",
    "load_mnemos_checkpoint",
    "load_model",
    "spec_overrides",
]


def _module_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class MnemosLMAdapter(StatefulLM):
    """A :class:`StatefulLM` view of any model with ``MnemosLM``'s signature.

    The model needs ``forward(input_ids [B, T], cache=None) -> (logits [B, T, V], cache)``, ``init_cache(batch,
    device, dtype)`` and a ``config`` with ``vocab_size`` (and, for mnemos models, ``variant``). ``state_growth``
    is taken, in order, from the argument, the model's ``state_growth`` attribute (``MnemosLM`` has one), or its
    variant's entry in the registry (:mod:`mnemos.models.registry`); ``max_context`` from the argument or
    ``config.max_context``. ``state_dtype`` is passed to ``init_cache`` (None: the model's choice, its parameters'
    dtype for ``MnemosLM``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str | None = None,
        state_growth: StateGrowth | None = None,
        max_context: int | None = None,
        tokenizer: Tokenizer | None = None,
        state_dtype: torch.dtype | None = None,
    ):
        for attr in ("forward", "init_cache"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"{type(model).__name__} has no {attr}(); MnemosLMAdapter needs MnemosLM's signature")
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", getattr(model, "vocab_size", None))
        if not isinstance(vocab, int):
            raise TypeError(f"{type(model).__name__} has neither config.vocab_size nor vocab_size")
        variant = getattr(config, "variant", None)
        spec = VARIANT_REGISTRY.get(variant) if isinstance(variant, str) else None
        growth = state_growth or getattr(model, "state_growth", None) or (spec and spec.state_growth)
        if growth not in get_args(StateGrowth):
            raise ValueError(
                f"cannot tell whether {type(model).__name__} (variant {variant!r}) has a constant or a growing state; "
                f"pass state_growth='constant' or 'growing'"
            )
        self.model = model.eval()
        self.config = config
        self.variant = variant
        self.name = name or (str(variant) if variant else type(model).__name__)
        self.vocab_size = vocab
        self.state_growth = growth
        self.max_context = max_context if max_context is not None else getattr(config, "max_context", None)
        self.tokenizer = tokenizer
        self.device, self.param_dtype = _module_device_dtype(model)
        self.state_dtype = state_dtype

    def init_state(self, batch: int) -> Any:
        return self.model.init_cache(batch, device=self.device, dtype=self.state_dtype)

    def forward(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.model(ids, cache=state)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["variant"] = self.variant
        d["parameters"] = sum(p.numel() for p in self.model.parameters())
        d["dtype"] = str(self.param_dtype).removeprefix("torch.")
        if dataclass_config := _config_dict(self.config):
            d["config"] = dataclass_config
        return d


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is not None and dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


class _HFTokenizer:
    """A Hugging Face tokenizer behind mnemos' :class:`~mnemos.data.Tokenizer` protocol."""

    def __init__(self, tok: Any):
        self._tok = tok
        self.vocab_size = len(tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else -1
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else -1
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else -1

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self._tok).__name__}, vocab_size={self.vocab_size})"


class HFCausalLMAdapter(StatefulLM):
    """A Hugging Face causal LM (``AutoModelForCausalLM``) streamed through ``past_key_values``.

    Its state is the model's KV cache, so it grows with the context (``state_growth="growing"``) unless told
    otherwise; ``max_context`` defaults to ``config.max_position_embeddings``. Text prompts are re-encoded with the
    model's own tokenizer (special tokens such as BOS added once, at the start). Load one from a local directory
    with :meth:`from_pretrained`; nothing is downloaded.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        max_context: int | None = None,
        state_growth: StateGrowth = "growing",
    ):
        config = model.config
        self.model = model.eval()
        self.config = config
        self.name = name or getattr(config, "name_or_path", None) or type(model).__name__
        self.vocab_size = int(config.vocab_size)
        self.state_growth = state_growth
        self.max_context = max_context if max_context is not None else getattr(config, "max_position_embeddings", None)
        self.tokenizer = _HFTokenizer(tokenizer) if tokenizer is not None else None
        self.device, self.param_dtype = _module_device_dtype(model)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> HFCausalLMAdapter:
        """Load model and tokenizer from a local directory (``local_files_only``); needs ``transformers``."""
        try:
            transformers = importlib.import_module("transformers")
        except ImportError as e:
            raise ImportError(
                "evaluating a Hugging Face model needs the optional 'transformers' package "
                "(pip install 'mnemos[hf]'); mnemos checkpoints and variants do not"
            ) from e
        path = str(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        if device is not None:
            model = model.to(device)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None  # then the model must read byte ids, like mnemos models
        return cls(model, tokenizer, name=name or Path(path).name)

    def init_state(self, batch: int) -> Any:
        return None  # the model creates its cache on the first call

    def forward(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        out = self.model(input_ids=ids, past_key_values=state, use_cache=True)
        return out.logits, out.past_key_values

    def encode_prompt(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return super().encode_prompt(text)
        return self.tokenizer.encode_prompt(text)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["parameters"] = sum(p.numel() for p in self.model.parameters())
        d["dtype"] = str(self.param_dtype).removeprefix("torch.")
        d["model_type"] = getattr(self.config, "model_type", None)
        return d


# -- building models from names and paths ---------------------------------------------------------------------------

def spec_overrides(text: str) -> dict[str, Any]:
    """The ``MnemosConfig`` fields of a model spec's overrides, in the override grammar of ``mnemos train``
    (:func:`mnemos.models.config.merge_overrides`): ``"model.d_model=64,model.memory.chunk_size=16"`` ->
    ``{"d_model": 64, "memory": {"chunk_size": 16}}``; values are YAML.

    A key without the ``model.`` prefix (``"d_model=64"``, the form eval specs took first) is read as a model field.
    Commas inside brackets or quotes belong to the value: ``"variant=hybrid,n_layers=2,layers=[gated_deltanet,swa]"``
    is three overrides.
    """
    items = [x.strip() for x in _split_top_level(text) if x.strip()]
    return merge_overrides({}, [x if x.startswith("model.") else f"model.{x}" for x in items]).get("model", {})


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside ``[...]``, ``{...}`` and quotes (a YAML list or mapping stays whole);
    unbalanced brackets or quotes are a ValueError naming the spec."""
    parts, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth < 0:
                break
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise ValueError(f"model spec overrides {text!r}: unbalanced brackets or quotes")
    return parts + [text[start:]]


def build_mnemos_model(
    variant: str, vocab_size: int, *, overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, name: str | None = None,
) -> MnemosLMAdapter:
    """A freshly initialised (untrained) ``MnemosLM`` of ``variant``, wrapped for the harness.

    ``overrides`` are further ``MnemosConfig`` fields (nested dicts for ``memory``); unknown keys are an error.
    Untrained models score chance on every task; use this to check a pipeline or to measure state sizes.
    """
    if variant not in VARIANT_REGISTRY and variant != HYBRID:
        raise ValueError(f"unknown mnemos variant {variant!r}; known: {', '.join(VARIANT_REGISTRY)}, {HYBRID} (with "
                         "layers=[...])")
    try:
        config = MnemosConfig.from_dict({"variant": variant, "vocab_size": vocab_size, **(overrides or {})})
    except TypeError as e:  # a field of the wrong type: a configuration error like any other
        raise ValueError(f"model {variant}: {e}") from None
    model = MnemosLM(config).to(device=device, dtype=dtype)
    return MnemosLMAdapter(model, name=name or f"{variant} (untrained)")


def _model_config(run_config: Any, where: Path) -> dict[str, Any]:
    """The ``MnemosConfig`` fields inside a checkpoint's config: the config itself, or its ``"model"`` entry."""
    if isinstance(run_config, dict):
        if "variant" in run_config:
            return run_config
        if isinstance(run_config.get("model"), dict):
            return run_config["model"]
    keys = sorted(run_config) if isinstance(run_config, dict) else type(run_config).__name__
    raise ValueError(f"{where}: cannot find the model config (a dict with 'variant', or under 'model'); got {keys}")


def _checkpoint_tokenizer(run_config: Any) -> Tokenizer | None:
    """The BPE tokenizer a checkpoint's run trained with, rebuilt from its data config (``"data"``, or the
    ``"task"`` of ``mnemos train``'s run config); None for byte tokens."""
    data = (run_config.get("data") or run_config.get("task")) if isinstance(run_config, dict) else None
    if not isinstance(data, dict) or data.get("tokenizer", "byte") == "byte":
        return None
    from mnemos.data import LMDataConfig

    names = {f.name for f in dataclasses.fields(LMDataConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return LMDataConfig(**kwargs).build(0).tokenizer  # deterministic: the same text gives the same BPE


def load_mnemos_checkpoint(
    path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    tokenizer: Tokenizer | None = None,
) -> MnemosLMAdapter:
    """A trained ``MnemosLM`` from a checkpoint directory written by :func:`mnemos.train.checkpoint.save_checkpoint`
    (``model.safetensors``, ``trainer.pt``, ``config.json``).

    The model config is the run config saved with the checkpoint (``trainer.pt``'s ``"config"``, else
    ``config.json``): either ``MnemosConfig`` fields or a dict with them under ``"model"`` (``mnemos train``'s
    run config). A run whose data used the BPE tokenizer gets it rebuilt (unless ``tokenizer`` is given), so text
    prompts are encoded as in training.
    """
    path = Path(path)
    if not (path.is_dir() and (path / "trainer.pt").is_file()):
        raise ValueError(f"{path} is not a mnemos checkpoint directory (no trainer.pt in it)")
    run_config = read_trainer_state(path).get("config")
    if run_config is None and (path / "config.json").is_file():
        run_config = json.loads((path / "config.json").read_text())
    config = MnemosConfig.from_dict(saved_model_config(_model_config(run_config, path)))
    model = MnemosLM(config)
    load_model_weights(path, model)
    model = model.to(device=device, dtype=dtype)
    # `mnemos train` writes RUN_DIR/checkpoint: name the model after the run, not the fixed folder name
    run_name = path.resolve().parent.name if path.name == "checkpoint" else path.name
    name = f"{run_name} ({config.variant})" if config.variant not in run_name else run_name
    return MnemosLMAdapter(model, name=name, tokenizer=tokenizer or _checkpoint_tokenizer(run_config))


def load_model(
    spec: str, *, vocab_size: int, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
) -> StatefulLM:
    """The model a command-line spec names.

    - ``baseline:induction[:ORDER]``, ``baseline:random``: reference models that need no weights
      (:mod:`mnemos.eval.reference_models`), sized to the task's ``vocab_size``;
    - a directory with ``trainer.pt``: a mnemos checkpoint (:func:`load_mnemos_checkpoint`);
    - another directory with a ``config.json``: a Hugging Face causal LM (needs ``transformers``);
    - a variant name, optionally with ``MnemosConfig`` overrides in the dotted grammar of ``mnemos train``
      (``lmm``, ``mac:model.d_model=64,model.n_layers=2``, ``swa:model.window=128,model.memory.chunk_size=16``;
      :func:`spec_overrides`): an untrained ``MnemosLM`` with ``vocab_size`` tokens (:func:`build_mnemos_model`).
    """
    if spec.startswith("baseline:"):
        return make_baseline(spec.removeprefix("baseline:"), vocab_size)
    path = Path(spec)
    if path.is_dir() and (path / "trainer.pt").is_file():
        return load_mnemos_checkpoint(path, device=device, dtype=dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return HFCausalLMAdapter.from_pretrained(path, device=device, dtype=dtype)
    variant, _, overrides = spec.partition(":")
    if (variant in VARIANT_REGISTRY or variant == HYBRID) and not path.exists():
        model = build_mnemos_model(variant, vocab_size, overrides=spec_overrides(overrides), device=device,
                                   dtype=dtype, name=f"{spec} (untrained)")
        # only once the spec is valid: a typo in it gets its error alone
        warnings.warn(f"--model {spec}: a randomly initialised {variant} model (no checkpoint); expect chance scores",
                      stacklevel=2)
        return model
    raise ValueError(
        f"model {spec!r} is not a checkpoint directory, a Hugging Face directory, a mnemos variant "
        f"({', '.join(VARIANT_REGISTRY)}, optionally VARIANT:model.KEY=VALUE,...; {HYBRID}:layers=[...]) or a baseline "
        "(baseline:induction, baseline:random)"
    )
