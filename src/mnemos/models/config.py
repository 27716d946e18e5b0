"""One typed config for every model variant: Titans (LMM, MAC, MAG, MAL) and the baselines.

Plain dataclasses, no Hugging Face import, so a ``PretrainedConfig`` can mirror them field for field:
``MnemosConfig.to_dict()`` gives nested JSON-ready dicts and ``MnemosConfig.from_dict`` reads them back, rejecting
unknown keys by name. Every field is checked in ``__post_init__`` (type, range, and the combinations that matter);
the ``memory`` section's fields, defaults and range checks are the layer's own (:class:`mnemos.layers.MemorySettings`,
which :class:`MemoryConfig` extends), so the layers take ``config.memory`` whole and check nothing twice. The
recurrent baselines' layers have small sections of their own, read only by their variant (``mamba2``, ``based``,
``mom``, ``lm2``: :data:`SECTIONS`). ``layers`` (with ``variant="hybrid"``) makes a hybrid stack, one registered
variant per block.

One override grammar for every command line that sets config fields: dotted keys and YAML values,
``model.memory.chunk_size=16`` (:func:`parse_override`, :func:`merge_overrides`); ``mnemos train`` takes them for
every section of a run config, ``mnemos eval --model mac:model.d_model=64,model.n_layers=2`` for a model.

Which fields each variant reads (the others are ignored, never silently reinterpreted) is part of its entry in the
variant registry (:mod:`mnemos.models.registry`); :func:`variant_reads` asks it, and the names the config accepts are
the registered ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..layers import QK_INITS, MemorySettings
from .registry import COMMON_INIT_ONLY, VARIANT_REGISTRY, variant_spec
from .registry import HYBRID, stack_reads_field, stack_variants

__all__ = ["MnemosConfig", "MemoryConfig", "Mamba2Config", "BasedConfig", "MoMConfig", "LM2Config", "SECTIONS",
           "HYBRID", "ConfigTypeError", "VARIANTS", "TITANS_VARIANTS", "BASELINE_VARIANTS", "ATTENTION_VARIANTS",
           "INIT_ONLY_FIELDS", "merge_overrides", "parse_override", "read_yaml", "saved_model_config", "variant_reads"]

# the registered variants (mnemos.models.registry), and subsets of them; all read from the registry at import
VARIANTS: tuple[str, ...] = tuple(VARIANT_REGISTRY)
TITANS_VARIANTS: tuple[str, ...] = tuple(n for n, s in VARIANT_REGISTRY.items() if s.family == "titans")
BASELINE_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v not in TITANS_VARIANTS)
# variants with a softmax-attention mixer (RoPE needs an even head dim)
ATTENTION_VARIANTS: tuple[str, ...] = tuple(n for n, s in VARIANT_REGISTRY.items() if s.rope)
# fields that only set an initialisation: a checkpoint's weights override them (resume does not compare them)
INIT_ONLY_FIELDS: tuple[str, ...] = COMMON_INIT_ONLY + tuple(
    dict.fromkeys(f for s in VARIANT_REGISTRY.values() for f in s.init_only))


def variant_reads(variant: str, key: str) -> bool:
    """Whether ``variant`` reads the config field ``key`` (``"window"``, or ``"memory.max_lr"`` for a nested one);
    resuming a checkpoint compares only what its variant reads.

    >>> variant_reads("transformer", "memory.max_lr"), variant_reads("deltanet", "memory.conv_size")
    (False, True)
    """
    return variant_spec(variant).reads_field(key)


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (``model.d_model=abc``). A ``TypeError``, and a ``ValueError`` like every other
    bad config value, so that whoever reports configuration errors (the ``mnemos`` command) catches it with them
    while a ``TypeError`` from a bug still surfaces as one."""


def _check_field(where: str, value: Any, hint: Any) -> None:
    """Raise unless ``value`` matches the resolved annotation ``hint`` (int, float, bool, str, Literal, X | None,
    tuple[X, ...])."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{where} must be one of {choices}, got {value!r}")
        return
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        (inner,) = [a for a in args if a is not type(None)]
        _check_field(where, value, inner)
        return
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, tuple):
            raise ConfigTypeError(f"{where} must be a list (e.g. [a, b]), got {value!r} ({type(value).__name__})")
        for i, item in enumerate(value):
            _check_field(f"{where}[{i}]", item, typing.get_args(hint)[0])
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    else:  # nested config classes are checked by their owner
        return
    if not ok:
        raise ConfigTypeError(f"{where} must be of type {hint.__name__}, got {value!r} ({type(value).__name__})")


class _ConfigBase:
    """``to_dict`` / ``from_dict`` with unknown-key rejection, and field type checks; shared by both configs."""

    _where = ""  # dotted prefix of the keys in error messages: the key as an override names it (``model.d_model``)

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_field(f"{self._where}{f.name}", getattr(self, f.name), hints[f.name])

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-ready) of every field, resolved defaults included."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a (nested) dict. Unknown keys are an error that names them; missing keys take defaults."""
        if not isinstance(d, dict):
            section = f" (the section {cls._where.rstrip('.')})" if cls._where else ""
            raise ConfigTypeError(f"{cls.__name__}.from_dict needs a dict{section}, got {d!r} ({type(d).__name__})")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names), key=str)
        if unknown:
            keys = [f"{cls._where}{k}" for k in unknown]
            raise ValueError(f"unknown {cls.__name__} keys {keys}; valid keys: {names}")
        return cls(**d)


@dataclass
class MemoryConfig(_ConfigBase, MemorySettings):
    """The Titans neural memory of every layer that has one: :class:`mnemos.layers.MemorySettings` (the fields, their
    defaults and range checks, which the layer owns), plus the dict round trip and the type checks of a config.
    ``NeuralMemory(dim, heads, config=config.memory)`` takes it as it is.
    """

    _where = "model.memory."

    def __post_init__(self):
        self._check_types()
        super().__post_init__()  # MemorySettings': the range checks


def _check_ints_at_least(section: _ConfigBase, names: tuple[str, ...], low: int = 1) -> None:
    for name in names:
        if getattr(section, name) < low:
            raise ValueError(f"{section._where}{name} must be >= {low}, got {getattr(section, name)}")


@dataclass
class Mamba2Config(_ConfigBase):
    """The Mamba-2 layer of variant ``mamba2`` (:class:`mnemos.models.mamba2.Mamba2Mixer`). Its heads are the model's
    ``n_heads``: the head dim is ``expand * d_model / n_heads``. Defaults are small for CPUs (the reference layer:
    d_state 128, expand 2, conv 4, chunk 256)."""

    _where = "model.mamba2."

    d_state: int = 16  # N: state size per head dim; the SSM state is n_heads * head_dim * d_state per layer
    expand: int = 2  # d_inner = expand * d_model
    conv_size: int = 4  # width of the causal conv over x, B and C
    chunk_size: int = 64  # tokens per chunk of the SSD computation: how, not what (exact for any value)

    def __post_init__(self):
        self._check_types()
        _check_ints_at_least(self, ("d_state", "expand", "conv_size", "chunk_size"))


@dataclass
class BasedConfig(_ConfigBase):
    """The BASED linear-attention layer of variant ``based`` (:class:`mnemos.models.based.BasedLinearAttention`):
    q and k are projected to ``feature_dim`` per head before the 2nd-order Taylor map (1 + F + F^2 features: 273 at
    the paper's 16). Variant ``jrt_rnn`` (:class:`mnemos.models.jrt.PrefixLinearAttention`, BASED's layer with a
    non-causal prefix) reads the section too, and ``prefix_len``, its own; variant ``baseconv`` (the gated short
    convolution of BASED's hybrid, :class:`mnemos.models.based.BaseConv`) reads ``conv_size``."""

    _where = "model.based."

    feature_dim: int = 16  # F, per head
    chunk_size: int = 64  # tokens per chunk of the computation: how, not what (exact for any value)
    # JRT-RNN (variant jrt_rnn, BASED's prefix linear attention; the based variant ignores it): the stream's first
    # prefix_len tokens are read by its non-causal encoder (0: none, causal linear attention). 1, a one-token prefix,
    # is causal; set it to the prompt length (the paper: 1024 of 2048). See mnemos.models.jrt.
    prefix_len: int = 1
    # BaseConv (variant baseconv): the taps of its causal depthwise convolution (the paper's hybrid: 3)
    conv_size: int = 3

    def __post_init__(self):
        self._check_types()
        _check_ints_at_least(self, ("feature_dim", "chunk_size", "conv_size"))
        _check_ints_at_least(self, ("prefix_len",), 0)


@dataclass
class MoMConfig(_ConfigBase):
    """The Mixture-of-Memories layer of variant ``mom`` (:class:`mnemos.models.mom.MixtureOfMemories`): M Gated
    DeltaNet memories, each token routed to the top k of them, and a shared memory every token writes. Defaults are
    the paper's (4 memories, top-2, shared memory, load-balancing loss scale 1e-3). Its conv width is
    ``memory.conv_size``, as for the delta-rule baselines."""

    _where = "model.mom."

    num_memories: int = 4  # M, the routed memories
    top_k: int = 2  # k, the memories each token is routed to (1 <= k <= M)
    shared_memory: bool = True  # the memory every token writes, read with weight 1
    aux_loss_scale: float = 1e-3  # the load-balancing loss's factor in the training loss (the paper's best; 0: off)

    def __post_init__(self):
        self._check_types()
        _check_ints_at_least(self, ("num_memories", "top_k"))
        if self.top_k > self.num_memories:
            raise ValueError(f"model.mom.top_k ({self.top_k}) must be at most model.mom.num_memories "
                             f"({self.num_memories})")
        if not (math.isfinite(self.aux_loss_scale) and self.aux_loss_scale >= 0):
            raise ValueError(f"model.mom.aux_loss_scale must be a finite number >= 0, got {self.aux_loss_scale}")


# the nested sections of MnemosConfig besides memory: field name -> class (a dict in JSON and Hugging Face configs)
SECTIONS: dict[str, type[_ConfigBase]] = {"mamba2": Mamba2Config, "based": BasedConfig}
SECTIONS["mom"] = MoMConfig


@dataclass
class LM2Config(_ConfigBase):
    """The LM2 memory of variant ``lm2`` (:class:`mnemos.models.lm2.LM2Layer`): a bank of ``num_slots`` slots of
    width d_model beside each block's sliding-window attention (``model.window``); the segment length is
    ``num_slots`` (slot r <-> position r of a segment). Small for CPUs (the paper: 2048, its training length)."""

    _where = "model.lm2."

    num_slots: int = 64  # N: slots of the bank = tokens per segment

    def __post_init__(self):
        self._check_types()
        _check_ints_at_least(self, ("num_slots",))


SECTIONS["lm2"] = LM2Config


@dataclass
class MnemosConfig(_ConfigBase):
    """Config of :class:`mnemos.models.MnemosLM` for every variant (see the module docstring for who reads what).

    Example:
        >>> cfg = MnemosConfig(variant="mag", vocab_size=64, d_model=32, n_layers=2, n_heads=4, window=8)
        >>> MnemosConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> cfg.head_dim, cfg.mlp_hidden_size
        (8, 88)
    """

    _where = "model."

    variant: str = "mac"  # a registered variant (mnemos.models.registry)
    # sizes: the Titans paper's smallest scale (~170M parameters at a 32k vocabulary)
    vocab_size: int = 32000  # set it from the tokenizer
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12  # head dim = d_model / n_heads, for attention and memory alike
    mlp_hidden: int | None = None  # SwiGLU hidden width; None: 8/3 * d_model rounded up to a multiple of 8
    # short-term memory
    window: int = 512  # sliding-window width of swa, mag and mal (the token sees itself and window - 1 before)
    segment_len: int = 512  # MAC's segment length N: attention is local to a segment
    num_persistent: int = 4  # persistent-memory tokens N_p of the Titans variants (0 = none)
    # MAG's mixing gate g = sigmoid(W_g x + b_g) starts with b_g = mag_gate_bias: -2 gives attention 0.12 and the memory
    # 0.88 of the output at init (with 0, MAG left the MQAR plateau at step ~1300, at -2 by ~600-800: docs/MODELS.md)
    mag_gate_bias: float = -2.0
    # MAL's memory read joins the residual stream itself (memory and attention as two residual layers); False: only
    # through the attention, o = SWA(RMSNorm(M(x))) (then MAL left the MQAR plateau 500 to 1500+ steps later, by seed)
    mal_memory_residual: bool = True
    # MAC's memory is written with the mixer's input and its read added to the attention output, o = y + M(RMSNorm(x));
    # False: the paper's form, written with the attention output and gating it, o = y * sigmoid(M(RMSNorm(y))) (then
    # MAC stayed on the MQAR plateau: 0.136 at step 1500 where the LMM reached 0.97)
    mac_memory_residual: bool = True
    # MAC's attention output projection starts at this multiple of its default init (residual form only): 0 starts the
    # block as its memory alone, o = M(RMSNorm(x)), and the attention grows in as it gets gradient (at 1, MAC sat on the
    # MQAR 1/K plateau past step 1750 in the recall study's setting; at 0 seeds 0 / 1 / 2 reached .933 / .909 / .377 at
    # step 1500: docs/MODELS.md)
    mac_attn_init_scale: float = 0.0
    rope_base: float = 10000.0
    # DeltaNet's and Gated DeltaNet's q / k start: "random" (their papers') or "successor" (W_k a copy of W_q, the
    # conv's key tap on the previous token: memory.qk_init's default for the Titans memory; docs/MODELS.md, "How the
    # memory learns to recall")
    delta_qk_init: str = "random"
    # long-term memory
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # recurrent baselines' layers (each read only by its variant)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    based: BasedConfig = field(default_factory=BasedConfig)
    mom: MoMConfig = field(default_factory=MoMConfig)
    lm2: LM2Config = field(default_factory=LM2Config)
    # a hybrid stack (variant "hybrid"): one registered variant per block, n_layers of them; a list ending in "..."
    # is a pattern repeated to n_layers ([gated_deltanet, gated_deltanet, transformer, ...]). None: every block is
    # `variant`. Each block's mixer is built from this config as if it were its variant's own.
    layers: tuple[str, ...] | None = None
    # the rest of the skeleton
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # LM head shares the embedding matrix (saves vocab_size * d_model parameters)
    init_std: float = 0.02  # embedding (and untied head) init; layers keep their own inits

    def __post_init__(self):
        if isinstance(self.memory, dict):  # a nested dict, e.g. from JSON or a Hugging Face config
            self.memory = MemoryConfig.from_dict(self.memory)
        if not isinstance(self.memory, MemoryConfig):
            raise ConfigTypeError(f"model.memory must be a MemoryConfig or a dict (the section of model.memory.* "
                                  f"keys), got {self.memory!r} ({type(self.memory).__name__})")
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise ConfigTypeError(f"model.{name} must be a {cls.__name__} or a dict (the section of model.{name}.* "
                                      f"keys), got {value!r} ({type(value).__name__})")
        if self.variant != HYBRID:
            try:
                variant_spec(self.variant)  # a ValueError naming the registered variants
            except ValueError as e:
                raise ValueError(f"model.variant: {e} (or {HYBRID!r} with model.layers)") from None
        if isinstance(self.layers, list):  # from YAML / JSON
            self.layers = tuple(self.layers)
        self._check_types()
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        self._check_layers()
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        rope = [v for v in dict.fromkeys(stack_variants(self)) if variant_spec(v).rope]
        if rope and self.head_dim % 2:
            raise ValueError(
                f"variant {rope[0]!r} uses RoPE, which needs an even head dim; model.d_model / model.n_heads = "
                f"{self.d_model} / {self.n_heads} = {self.head_dim}"
            )
        if self.window < 1:
            raise ValueError(f"model.window must be >= 1, got {self.window}")
        if self.segment_len < 1:
            raise ValueError(f"model.segment_len must be >= 1, got {self.segment_len}")
        if self.num_persistent < 0:
            raise ValueError(f"model.num_persistent must be >= 0, got {self.num_persistent}")
        if not math.isfinite(self.mag_gate_bias):
            raise ValueError(f"model.mag_gate_bias must be a finite number, got {self.mag_gate_bias}")
        if not (math.isfinite(self.mac_attn_init_scale) and self.mac_attn_init_scale >= 0):
            raise ValueError(f"model.mac_attn_init_scale must be a finite number >= 0, got {self.mac_attn_init_scale}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"model.mlp_hidden must be None or >= 1, got {self.mlp_hidden}")
        if self.delta_qk_init not in QK_INITS:
            raise ValueError(f"model.delta_qk_init must be 'successor' or 'random', got {self.delta_qk_init!r}")
        if not self.rope_base > 1:
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if not self.init_std > 0:
            raise ValueError(f"model.init_std must be > 0, got {self.init_std}")

    def _check_layers(self) -> None:
        """``layers``: None (variant not "hybrid"), or, with variant "hybrid", one registered variant per block; a
        list ending in ``"..."`` repeats the entries before it to n_layers. Stored expanded."""
        if self.layers is None:
            if self.variant == HYBRID:
                raise ValueError(f"model.variant {HYBRID!r} needs model.layers: one registered variant per block "
                                 f"(e.g. [gated_deltanet, gated_deltanet, transformer, ...])")
            return
        if self.variant != HYBRID:
            raise ValueError(f"model.layers makes a hybrid stack: set model.variant={HYBRID} (got "
                             f"{self.variant!r}), or leave model.layers unset")
        names = list(self.layers)
        if names and names[-1] == "...":  # a pattern, repeated to n_layers
            pattern = names[:-1]
            if not pattern or self.n_layers % len(pattern):
                raise ValueError(f"model.layers: the pattern {pattern} before '...' must have a length that divides "
                                 f"model.n_layers ({self.n_layers})")
            names = pattern * (self.n_layers // len(pattern))
        if len(names) != self.n_layers:
            raise ValueError(f"model.layers must name one variant per block: {len(names)} for model.n_layers = "
                             f"{self.n_layers} (end the list with '...' to repeat a pattern)")
        for i, name in enumerate(names):
            if name not in VARIANT_REGISTRY:
                raise ValueError(f"model.layers[{i}]: unknown variant {name!r}; expected one of "
                                 f"{tuple(VARIANT_REGISTRY)}")
        self.layers = tuple(names)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])  # as JSON and YAML give it back
        return d

    @property
    def block_variants(self) -> tuple[str, ...]:
        """The variant of each block: ``layers``, or ``variant`` n_layers times."""
        return stack_variants(self)

    def reads_field(self, key: str) -> bool:
        """Whether this model reads the config field ``key``: its variant's entry says so (:func:`variant_reads`),
        or, for a hybrid stack, one of its blocks' variants does (the union of their reads)."""
        return stack_reads_field(self, key)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden_size(self) -> int:
        """The SwiGLU hidden width: ``mlp_hidden`` or 8/3 * d_model (same parameters as a 4x GELU MLP), to x8."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        hidden = math.ceil(8 * self.d_model / 3)
        return -(-hidden // 8) * 8

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MnemosConfig":
        return super().from_dict(d)


# memory.* keys added after mnemos first saved configs, with the value that reproduces a model saved without them
# (the free theta = max_lr * sigmoid(.) came first; then a per-token bound and raw values)
# The memory rule's keys (memory.rule, its axes, memory.momentum) are not here: their defaults (titans, no overrides,
# momentum on) are what every model saved before them computes.
MEMORY_KEYS_ADDED = {"ema_momentum": False, "max_chunk_lr": None, "value_norm": False, "normalize_step": False,
                     "qk_init": "random", "momentum_clock": False}
# model keys added since, likewise (MAL's memory read reached the stream only through its attention; MAC's memory
# was written with the attention output and gated it)
# (the sections mamba2.* and based.* are not here: no model saved before them reads them, so their defaults do;
# mac_attn_init_scale only sets an initialisation, 1 reproduces the runs before it; so does memory.forget_bias, whose
# default -8 is the initialisation before it)
MODEL_KEYS_ADDED = {"mal_memory_residual": False, "mac_memory_residual": False, "mac_attn_init_scale": 1.0}
# (model.layers came with hybrid stacks: a config saved before it is one variant in every block; the section mom.*
# is not here, for the reason of mamba2.* and based.*)
MODEL_KEYS_ADDED["layers"] = None


def saved_model_config(d: dict[str, Any]) -> dict[str, Any]:
    """A model-config dict read back from a saved model (checkpoint, Hugging Face directory), completed so that it
    builds the model that was saved: a key added since the config was written takes the value that reproduces the old
    behaviour (``MODEL_KEYS_ADDED``, ``MEMORY_KEYS_ADDED``), not today's default. Configs written now carry every key
    and come back unchanged; configs a user writes are not passed through this."""
    if not isinstance(d, dict):
        return d  # from_dict reports the type error
    memory = {} if d.get("memory") is None else d["memory"]
    if not isinstance(memory, dict):
        return d  # from_dict reports it
    memory = dict(memory)
    if "step_bound" in memory:  # saved before max_chunk_lr replaced it: "chunk" bounded the chunk's sum by max_lr
        bound = memory.pop("step_bound")
        memory.setdefault("max_chunk_lr", memory.get("max_lr", MemoryConfig.max_lr) if bound == "chunk" else None)
    return {**MODEL_KEYS_ADDED, **d, "memory": {**MEMORY_KEYS_ADDED, **memory}}


# -- dotted overrides: section.key=value ---------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but ``1e-3`` is a float (plain YAML 1.1 reads it as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """YAML (a config file, an override's value), with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    return problem + ("" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.memory.chunk_size=16"`` -> (["model", "memory", "chunk_size"], 16): a dotted key (a section and a
    key at least; a leading ``--`` is dropped) and a YAML value."""
    if "=" not in text:
        raise ValueError(f"an override must look like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().lstrip("-").split(".") if p]
    if len(path) < 2:
        raise ValueError(f"an override must name a section and a key (e.g. optim.lr=1e-3), got {text!r}")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse the value of {key.strip()!r} as YAML: {_yaml_problem(e)}") from None
    return path, value


def merge_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each of ``overrides`` (:func:`parse_override`) in the nested dict ``d``, in place; returns ``d``."""
    for text in overrides:
        path, value = parse_override(text)
        node = d
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {p} is a value, not a section")
        node[path[-1]] = value
    return d
