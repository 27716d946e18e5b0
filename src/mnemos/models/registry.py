"""The registry of model variants: everything mnemos knows about a variant, in one :class:`VariantSpec` each.

A variant is a token mixer in the one block skeleton (:class:`~mnemos.models.Block`). Its entry says how to build
that mixer from a :class:`~mnemos.models.MnemosConfig`, which state the mixer keeps between calls and what bounds
its size, and which config fields it reads. Everything else reads the registry instead of keeping its own list:

- ``MnemosConfig`` accepts exactly the registered names (``config.VARIANTS`` and its subsets are derived here), and
  ``"hybrid"`` with ``layers``, one registered name per block (the ``stack_*`` functions at the end say of a stack
  what an entry says of a variant);
- ``MnemosLM`` builds each block's mixer with ``spec.build`` and exposes ``spec.state_growth``;
- ``mnemos train --resume`` compares only the fields a checkpoint's variant reads (``MnemosConfig.reads_field``;
  ``config.variant_reads`` for a name);
- the eval adapters take a model's state growth from it, the harness a sliding window's reach (``stack_reach``);
- the invariant tests (tests/models/test_registry.py, test_models.py) run every registered variant.

To add a variant: write its mixer (``forward(x [B, T, d], state=None) -> (y, state)`` and ``init_state(batch,
device, dtype)``; a new state type goes in ``models/cache.py``), then add one :func:`register_variant` call below.

The entries at the end of this file are the table; ``describe_variants()`` prints it in markdown.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Callable, Literal

from torch import nn

from ..layers import Attention, FullKVCache, MemorySettings, NeuralMemoryState, RollingKVCache
from .baselines import LinearRecurrence
from .cache import MACState, MAGState, MALState, RecurrentState
from .titans import LongTermMemory, MemoryAsContext, MemoryAsGate, MemoryAsLayer
from .based import BaseConv, BasedLinearAttention
from .cache import BaseConvState, BasedState, Mamba2State
from .mamba2 import Mamba2Mixer
from .cache import MoMState
from .mom import MixtureOfMemories
from .jrt import JRTState, PrefixLinearAttention
from .lm2 import LM2Layer, LM2State

if TYPE_CHECKING:
    from .config import MnemosConfig

__all__ = ["VariantSpec", "VARIANT_REGISTRY", "COMMON_READS", "COMMON_INIT_ONLY", "StateGrowth", "register_variant",
           "variant_spec", "describe_variants"]

StateGrowth = Literal["constant", "growing"]

# the MnemosConfig fields every variant reads (the skeleton: embedding, blocks, norms, head)
COMMON_READS = ("variant", "vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "norm_eps", "tie_embeddings",
                "init_std", "layers")
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
    unknown = {f for f in spec.init_only if not spec.reads_field(f)}
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
                           attn_init_scale=c.mac_attn_init_scale, memory_config=c.memory)


def _mag(c: MnemosConfig) -> nn.Module:
    return MemoryAsGate(c.d_model, c.n_heads, window=c.window, num_persistent=c.num_persistent, rope_base=c.rope_base,
                        norm_eps=c.norm_eps, gate_bias=c.mag_gate_bias, memory_config=c.memory)


def _mal(c: MnemosConfig) -> nn.Module:
    return MemoryAsLayer(c.d_model, c.n_heads, window=c.window, num_persistent=c.num_persistent,
                         rope_base=c.rope_base, norm_eps=c.norm_eps, memory_residual=c.mal_memory_residual,
                         memory_config=c.memory)


def _transformer(c: MnemosConfig) -> nn.Module:
    return Attention(c.d_model, c.n_heads, rope_base=c.rope_base)


# the memory.* fields of the Titans variants that only set an initialisation (resume ignores them)
MEMORY_INIT_ONLY = ("memory.qk_init",)


def _swa(c: MnemosConfig) -> nn.Module:
    return Attention(c.d_model, c.n_heads, window=c.window, rope_base=c.rope_base)


def _linear_recurrence(c: MnemosConfig) -> nn.Module:
    # its conv and impl; the chunk is the baseline's own (64: exact for any value)
    return LinearRecurrence(c.d_model, c.n_heads, c.variant, conv_size=c.memory.conv_size, impl=c.memory.impl,
                            qk_init="random" if c.variant == "linear_attention" else c.delta_qk_init)


register_variant(VariantSpec(
    "lmm", "titans", _lmm, NeuralMemoryState, "constant", ("memory", "num_persistent"), init_only=MEMORY_INIT_ONLY,
    summary="the neural memory alone as the mixer (persistent tokens written into it at stream start)"))
register_variant(VariantSpec(
    "mac", "titans", _mac, MACState, "segment_len",
    ("memory", "segment_len", "num_persistent", "rope_base", "mac_memory_residual", "mac_attn_init_scale"),
    init_only=("mac_attn_init_scale", *MEMORY_INIT_ONLY), rope=True,
    summary="memory as a context: attention within a segment over retrieved and persistent tokens"))
register_variant(VariantSpec(
    "mag", "titans", _mag, MAGState, "window",
    ("memory", "window", "num_persistent", "rope_base", "mag_gate_bias"), init_only=("mag_gate_bias", *MEMORY_INIT_ONLY),
    rope=True,
    summary="memory as a gate: sliding-window attention and the memory, mixed by a learned gate"))
register_variant(VariantSpec(
    "mal", "titans", _mal, MALState, "window",
    ("memory", "window", "num_persistent", "rope_base", "mal_memory_residual"), init_only=MEMORY_INIT_ONLY, rope=True,
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
    "deltanet", "baseline", _linear_recurrence, RecurrentState, "constant",
    ("memory.conv_size", "memory.impl", "delta_qk_init"), init_only=("delta_qk_init",),
    summary="DeltaNet (per-token delta rule, computed exactly in chunks of 64)"))
register_variant(VariantSpec(
    "gated_deltanet", "baseline", _linear_recurrence, RecurrentState, "constant",
    ("memory.conv_size", "memory.impl", "delta_qk_init"), init_only=("delta_qk_init",),
    summary="Gated DeltaNet (decayed delta rule, computed exactly in chunks of 64)"))


# -- the recurrent baselines of issue 16 -------------------------------------------------------------------------------

def _mamba2(c: MnemosConfig) -> nn.Module:
    m = c.mamba2
    return Mamba2Mixer(c.d_model, c.n_heads, d_state=m.d_state, expand=m.expand, conv_size=m.conv_size,
                       chunk_size=m.chunk_size, norm_eps=c.norm_eps)


# mamba2.chunk_size is how the SSD is computed, not what (exact for any value): not among the reads, so resuming
# with another chunk size is allowed
register_variant(VariantSpec(
    "mamba2", "baseline", _mamba2, Mamba2State, "constant", ("mamba2.d_state", "mamba2.expand", "mamba2.conv_size"),
    summary="Mamba-2 (SSD: per-head scalar data-dependent decay, short conv, gated RMSNorm, D skip; exact chunks)"))


def _based(c: MnemosConfig) -> nn.Module:
    return BasedLinearAttention(c.d_model, c.n_heads, feature_dim=c.based.feature_dim, chunk_size=c.based.chunk_size)


# based.chunk_size, likewise, is how and not what
register_variant(VariantSpec(
    "based", "baseline", _based, BasedState, "constant", ("based.feature_dim",),
    summary="BASED's linear attention (2nd-order Taylor feature map, normalised; exact chunks), in every block"))


def _baseconv(c: MnemosConfig) -> nn.Module:
    return BaseConv(c.d_model, kernel_size=c.based.conv_size)


# the short-conv layers of BASED's hybrid (with `based` and `swa` blocks: model.layers=[baseconv, based, swa, ...])
register_variant(VariantSpec(
    "baseconv", "baseline", _baseconv, BaseConvState, "constant", ("based.conv_size",),
    summary="BASED's gated short convolution (BaseConv): a causal depthwise conv of based.conv_size taps times a "
            "linear projection, for the paper's hybrid"))


def _jrt_rnn(c: MnemosConfig) -> nn.Module:
    b = c.based
    return PrefixLinearAttention(c.d_model, c.n_heads, feature_dim=b.feature_dim, prefix_len=b.prefix_len,
                                 chunk_size=b.chunk_size)


# JRT-RNN shares BASED's section (its feature map), and reads based.prefix_len, the stream's first tokens its
# non-causal encoder reads (mnemos.models.jrt)
register_variant(VariantSpec(
    "jrt_rnn", "baseline", _jrt_rnn, JRTState, "constant", ("based.feature_dim", "based.prefix_len"),
    summary="JRT-RNN's prefix linear attention: a non-causal encoder over the first based.prefix_len tokens, "
            "BASED's causal linear attention after it, one combined state"))


# -- the Miras and Atlas memories (issue 14): LMM stacks whose memory runs their paper's rule --------------------------

def _rule_lmm(rule: str, momentum: bool) -> Callable[[MnemosConfig], nn.Module]:
    """The LMM mixer with ``memory.rule`` set to the preset ``rule`` and ``memory.momentum`` to ``momentum`` (False:
    eta = 0, the plain gradient descent of Miras' models); every other memory.* key applies, the axes included, but
    ``memory.impl``: "auto", which takes the op's chunked torch path for these rules (the Triton kernels cover
    Titans' axes only and refuse them; the token-by-token reference is for tests, not a speed path)."""
    def build(c: MnemosConfig) -> nn.Module:
        memory = replace(c.memory, rule=rule, momentum=momentum, impl="auto")
        return LongTermMemory(c.d_model, c.n_heads, num_persistent=c.num_persistent, memory_config=memory)
    return build


# what they read: LMM's fields but memory.rule, memory.momentum and memory.impl, which the variant fixes
_RULE_LMM_READS = tuple(f"memory.{f.name}" for f in fields(MemorySettings)
                        if f.name not in ("rule", "momentum", "impl")) + ("num_persistent",)
register_variant(VariantSpec(
    "moneta", "titans", _rule_lmm("moneta", False), NeuralMemoryState, "constant", _RULE_LMM_READS,
    init_only=MEMORY_INIT_ONLY,
    summary="Moneta (Miras): the memory alone, lp loss (p 3), lq retention (q 4), plain gradient descent"))
register_variant(VariantSpec(
    "yaad", "titans", _rule_lmm("yaad", False), NeuralMemoryState, "constant", _RULE_LMM_READS,
    init_only=MEMORY_INIT_ONLY,
    summary="Yaad (Miras): the memory alone, Huber loss with a learned threshold per token, plain gradient descent"))
register_variant(VariantSpec(
    "memora", "titans", _rule_lmm("memora", False), NeuralMemoryState, "constant", _RULE_LMM_READS,
    init_only=MEMORY_INIT_ONLY,
    summary="Memora (Miras): the memory alone, KL retention (softmax rows), plain gradient descent"))
register_variant(VariantSpec(
    "atlas", "titans", _rule_lmm("atlas", True), NeuralMemoryState, "constant", _RULE_LMM_READS,
    init_only=MEMORY_INIT_ONLY,
    summary="Atlas: the memory alone, Omega window 4 with learned weights, Muon (Newton-Schulz) momentum"))


# -- MoM (issue 16) ----------------------------------------------------------------------------------------------------

def _mom(c: MnemosConfig) -> nn.Module:
    m = c.mom
    return MixtureOfMemories(c.d_model, c.n_heads, num_memories=m.num_memories, top_k=m.top_k,
                             shared_memory=m.shared_memory, aux_loss_scale=m.aux_loss_scale,
                             conv_size=c.memory.conv_size, impl=c.memory.impl)


# mom.aux_loss_scale changes the training loss, not the logits: read (resuming compares it) all the same
register_variant(VariantSpec(
    "mom", "baseline", _mom, MoMState, "constant",
    ("mom.num_memories", "mom.top_k", "mom.shared_memory", "mom.aux_loss_scale", "memory.conv_size", "memory.impl"),
    summary="MoM (Mixture-of-Memories): Gated DeltaNet memories, each token routed to the top k, plus a shared one"))


# -- LM2 (issue 16) ----------------------------------------------------------------------------------------------------

def _lm2(c: MnemosConfig) -> nn.Module:
    return LM2Layer(c.d_model, c.n_heads, num_slots=c.lm2.num_slots, window=c.window, rope_base=c.rope_base)


# the bank flows through depth and from the last LM2 block into the first at each segment end: MnemosLM runs its
# stacks segment-major (the relay protocol, mnemos.models.lm); its state is bounded by the window (the KV cache)
register_variant(VariantSpec(
    "lm2", "baseline", _lm2, LM2State, "window", ("lm2.num_slots", "window", "rope_base"), rope=True,
    summary="LM2 (Large Memory Models): sliding-window attention plus a bank of lm2.num_slots slots read by "
            "cross-attention (causal slot mask, segments of num_slots), gated in and out, flowing through depth and "
            "from the last block into the first at each segment end"))


# -- hybrid stacks: one registered variant per block (MnemosConfig.layers, with variant "hybrid") ----------------------
# What the registry says of a variant, said of a stack of blocks. Each takes a MnemosConfig, or anything with its
# fields variant, layers, n_layers and window (a Hugging Face config): for a plain config they give the variant's own
# answers.

HYBRID = "hybrid"  # MnemosConfig.variant of a hybrid stack (not a registered variant: its blocks are)


def stack_variants(config) -> tuple[str, ...]:
    """The variant of each block: ``config.layers`` for a hybrid stack, else ``config.variant`` n_layers times."""
    layers = getattr(config, "layers", None)
    return tuple(layers) if layers is not None else (config.variant,) * config.n_layers


def stack_reads_field(config, key: str) -> bool:
    """Whether a model of ``config`` reads the field ``key``: the union of its blocks' variants' reads."""
    return any(variant_spec(v).reads_field(key) for v in dict.fromkeys(stack_variants(config)))


def stack_state_growth(config) -> StateGrowth:
    """``"growing"`` if any block's state grows with the context (a full-attention block), else ``"constant"``."""
    growing = any(variant_spec(v).state_growth == "growing" for v in dict.fromkeys(stack_variants(config)))
    return "growing" if growing else "constant"


def stack_reach(config) -> int | None:
    """How far back attention alone sees through the stack: the sum of ``window - 1`` over its sliding-window blocks
    (the variants that read ``window``; ``VariantSpec.reach`` for a plain stack). None when no block has a window, or
    when one attends to every earlier token (full attention: nothing is out of its reach); a recurrent or memory block
    sees arbitrarily far back through its bounded state and adds nothing, as the memory of MAG and MAL does not."""
    specs = [variant_spec(v) for v in stack_variants(config)]
    if any(s.state_bound == "tokens" for s in specs) or not any("window" in s.reads for s in specs):
        return None
    return sum(config.window - 1 for s in specs if "window" in s.reads)


__all__ += ["HYBRID", "stack_variants", "stack_reads_field", "stack_state_growth", "stack_reach"]
