"""The registry of model variants: everything mnemos knows about a variant, in one :class:`VariantSpec` each.

A variant is a token mixer in the one block skeleton (:class:`~mnemos.models.Block`). Its entry says how to build
that mixer from a :class:`~mnemos.models.MnemosConfig`, which state the mixer keeps between calls and what bounds
its size, and which config fields it reads. Everything else reads the registry instead of keeping its own list:

- ``MnemosConfig`` accepts exactly the registered names (``config.VARIANTS`` and its subsets are derived here);
- ``MnemosLM`` builds each block's mixer with ``spec.build`` and exposes ``spec.state_growth``;
- ``mnemos train --resume`` compares only the fields a checkpoint's variant reads (``config.variant_reads``);
- the eval adapters take a model's state growth from it, the harness a sliding window's reach (``spec.reach``);
- the invariant tests (tests/models/test_registry.py, test_models.py) run every registered variant.

To add a variant: write its mixer (``forward(x [B, T, d], state=None) -> (y, state)`` and ``init_state(batch,
device, dtype)``; a new state type goes in ``models/cache.py``), then add one :func:`register_variant` call below.

The entries at the end of this file are the table; ``describe_variants()`` prints it in markdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from torch import nn

from ..layers import Attention, FullKVCache, NeuralMemoryState, RollingKVCache
from .baselines import LinearRecurrence
from .cache import MACState, MAGState, MALState, RecurrentState
from .titans import LongTermMemory, MemoryAsContext, MemoryAsGate, MemoryAsLayer

if TYPE_CHECKING:
    from .config import MnemosConfig

__all__ = ["VariantSpec", "VARIANT_REGISTRY", "COMMON_READS", "COMMON_INIT_ONLY", "StateGrowth", "register_variant",
           "variant_spec", "describe_variants"]

StateGrowth = Literal["constant", "growing"]

# the MnemosConfig fields every variant reads (the skeleton: embedding, blocks, norms, head)
COMMON_READS = ("variant", "vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "norm_eps", "tie_embeddings",
                "init_std")
# fields that only set an initialisation: a checkpoint's weights override them
COMMON_INIT_ONLY = ("init_std",)


@dataclass(frozen=True)
class VariantSpec:
    """One model variant.

    Attributes:
        name: the ``MnemosConfig.variant`` value.
        family: ``"titans"`` (a neural long-term memory) or ``"baseline"``.
        build: the token mixer of one block for a config of this variant.
        state: the type of the state its mixer keeps (``init_state``'s result; one per layer in ``Cache.layers``).
        state_bound: what bounds that state's size per sequence: ``"constant"``, the ``"window"``, the
            ``"segment_len"``, or the ``"tokens"`` seen so far (a state that grows with the context).
        reads: the config fields it reads besides :data:`COMMON_READS` (``"memory"`` = every ``memory.*`` field,
            ``"memory.impl"`` one of them); the others are ignored, never silently reinterpreted.
        init_only: those of ``reads`` that only set an initialisation (a checkpoint's weights override them).
        rope: its attention uses rotary embeddings, which need an even head dim.
        summary: one line for tables and help.
    """

    name: str
    family: Literal["titans", "baseline"]
    build: Callable[[MnemosConfig], nn.Module]
    state: type
    state_bound: Literal["constant", "window", "segment_len", "tokens"]
    reads: tuple[str, ...]
    init_only: tuple[str, ...] = ()
    rope: bool = False
    summary: str = ""

    @property
    def state_growth(self) -> StateGrowth:
        """``"growing"`` if the state grows with the context (a full KV cache), else ``"constant"`` (bounded)."""
        return "growing" if self.state_bound == "tokens" else "constant"

    def reads_field(self, key: str) -> bool:
        """Whether this variant reads the config field ``key`` (``"window"``, or ``"memory.max_lr"``)."""
        reads = COMMON_READS + self.reads
        return key in reads or ("." in key and key.split(".", 1)[0] in reads)

    def reach(self, config: MnemosConfig) -> int | None:
        """How far back attention alone sees: ``n_layers * (window - 1)`` for a sliding window (the variants that
        read ``window``), None otherwise."""
        return config.n_layers * (config.window - 1) if "window" in self.reads else None


VARIANT_REGISTRY: dict[str, VariantSpec] = {}


def register_variant(spec: VariantSpec) -> VariantSpec:
    """Add ``spec`` to the registry (a name may be registered once)."""
    if not isinstance(spec, VariantSpec):
        raise TypeError(f"spec must be a VariantSpec, got {type(spec).__name__}")
    if spec.name in VARIANT_REGISTRY:
        raise ValueError(f"variant {spec.name!r} is already registered")
    unknown = set(spec.init_only) - set(spec.reads)
    if unknown:
        raise ValueError(f"variant {spec.name!r}: init_only fields {sorted(unknown)} are not among its reads")
    VARIANT_REGISTRY[spec.name] = spec
    return spec


def variant_spec(name: str) -> VariantSpec:
    """The registered :class:`VariantSpec` of ``name``; a ``ValueError`` naming the known variants otherwise."""
    spec = VARIANT_REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown variant {name!r}; expected one of {tuple(VARIANT_REGISTRY)}")
    return spec


def describe_variants() -> str:
    """The registry as a markdown table: variant, family, state, its bound, and the fields it reads."""
    rows = ["| variant | family | state per layer | bounded by | reads (besides the common fields) |",
            "|---|---|---|---|---|"]
    for s in VARIANT_REGISTRY.values():
        rows.append(f"| {s.name} | {s.family} | {s.state.__name__} | {s.state_bound} | {', '.join(s.reads)} |")
    return "\n".join(rows)


# -- the mixers --------------------------------------------------------------------------------------------------------

def _lmm(c: MnemosConfig) -> nn.Module:
    return LongTermMemory(c.d_model, c.n_heads, num_persistent=c.num_persistent, memory_config=c.memory)


def _mac(c: MnemosConfig) -> nn.Module:
    return MemoryAsContext(c.d_model, c.n_heads, segment_len=c.segment_len, num_persistent=c.num_persistent,
                           rope_base=c.rope_base, norm_eps=c.norm_eps, memory_residual=c.mac_memory_residual,
                           memory_config=c.memory)


def _mag(c: MnemosConfig) -> nn.Module:
    return MemoryAsGate(c.d_model, c.n_heads, window=c.window, num_persistent=c.num_persistent, rope_base=c.rope_base,
                        norm_eps=c.norm_eps, gate_bias=c.mag_gate_bias, memory_config=c.memory)


def _mal(c: MnemosConfig) -> nn.Module:
    return MemoryAsLayer(c.d_model, c.n_heads, window=c.window, num_persistent=c.num_persistent,
                         rope_base=c.rope_base, norm_eps=c.norm_eps, memory_residual=c.mal_memory_residual,
                         memory_config=c.memory)


def _transformer(c: MnemosConfig) -> nn.Module:
    return Attention(c.d_model, c.n_heads, rope_base=c.rope_base)


def _swa(c: MnemosConfig) -> nn.Module:
    return Attention(c.d_model, c.n_heads, window=c.window, rope_base=c.rope_base)


def _linear_recurrence(c: MnemosConfig) -> nn.Module:
    # its conv and impl; the chunk is the baseline's own (64: exact for any value)
    return LinearRecurrence(c.d_model, c.n_heads, c.variant, conv_size=c.memory.conv_size, impl=c.memory.impl)


register_variant(VariantSpec(
    "lmm", "titans", _lmm, NeuralMemoryState, "constant", ("memory", "num_persistent"),
    summary="the neural memory alone as the mixer (persistent tokens written into it at stream start)"))
register_variant(VariantSpec(
    "mac", "titans", _mac, MACState, "segment_len",
    ("memory", "segment_len", "num_persistent", "rope_base", "mac_memory_residual"),
    rope=True, summary="memory as a context: attention within a segment over retrieved and persistent tokens"))
register_variant(VariantSpec(
    "mag", "titans", _mag, MAGState, "window",
    ("memory", "window", "num_persistent", "rope_base", "mag_gate_bias"), init_only=("mag_gate_bias",), rope=True,
    summary="memory as a gate: sliding-window attention and the memory, mixed by a learned gate"))
register_variant(VariantSpec(
    "mal", "titans", _mal, MALState, "window",
    ("memory", "window", "num_persistent", "rope_base", "mal_memory_residual"), rope=True,
    summary="memory as a layer: the memory, then sliding-window attention"))
register_variant(VariantSpec(
    "transformer", "baseline", _transformer, FullKVCache, "tokens", ("rope_base",), rope=True,
    summary="Transformer++: full causal attention with RoPE"))
register_variant(VariantSpec(
    "swa", "baseline", _swa, RollingKVCache, "window", ("window", "rope_base"), rope=True,
    summary="sliding-window attention"))
register_variant(VariantSpec(
    "linear_attention", "baseline", _linear_recurrence, RecurrentState, "constant", ("memory.impl",),
    summary="linear attention on the memory rule (computed in chunks of 64, exact for any chunk size)"))
register_variant(VariantSpec(
    "deltanet", "baseline", _linear_recurrence, RecurrentState, "constant", ("memory.conv_size", "memory.impl"),
    summary="DeltaNet (per-token delta rule, computed exactly in chunks of 64)"))
register_variant(VariantSpec(
    "gated_deltanet", "baseline", _linear_recurrence, RecurrentState, "constant", ("memory.conv_size", "memory.impl"),
    summary="Gated DeltaNet (decayed delta rule, computed exactly in chunks of 64)"))
