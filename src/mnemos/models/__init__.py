"""Models: Titans (LMM, MAC, MAG, MAL) and baselines (Transformer++, SWA, linear attention, DeltaNet, Gated
DeltaNet, Mamba-2, BASED, MoM, JRT-RNN, LM2), all one block skeleton, one config and one cache type; hybrid stacks mix them per
block (``MnemosConfig.layers``). See docs/MODELS.md."""

from .baselines import LinearRecurrence
from .block import Block, SwiGLU
from .cache import Cache, MACState, MAGState, MALState, RecurrentState
from .config import BASELINE_VARIANTS, TITANS_VARIANTS, VARIANTS, MemoryConfig, MnemosConfig, saved_model_config
from .lm import MnemosLM, build_mixer
from .registry import VARIANT_REGISTRY, VariantSpec, register_variant, variant_spec
from .mamba2 import Mamba2Mixer
from .based import BasedLinearAttention
from .cache import BasedState, Mamba2State
from .config import BasedConfig, Mamba2Config
from .mom import MixtureOfMemories
from .cache import MoMState
from .config import HYBRID, MoMConfig
from .jrt import JRTState, PrefixLinearAttention
from .lm2 import LM2Layer, LM2State
from .config import LM2Config
from .titans import LongTermMemory, MemoryAsContext, MemoryAsGate, MemoryAsLayer, mac_attention_mask

__all__ = [
    "MnemosConfig", "MemoryConfig", "VARIANTS", "TITANS_VARIANTS", "BASELINE_VARIANTS", "saved_model_config",
    "MnemosLM", "build_mixer", "Block", "SwiGLU", "VariantSpec", "VARIANT_REGISTRY", "register_variant", "variant_spec",
    "Cache", "MACState", "MAGState", "MALState", "RecurrentState",
    "LongTermMemory", "MemoryAsContext", "MemoryAsGate", "MemoryAsLayer", "LinearRecurrence", "mac_attention_mask",
]
# the recurrent baselines of issue 16
__all__ += ["Mamba2Mixer", "Mamba2State", "Mamba2Config", "BasedLinearAttention", "BasedState", "BasedConfig"]
__all__ += ["MixtureOfMemories", "MoMState", "MoMConfig", "HYBRID"]
__all__ += ["PrefixLinearAttention", "JRTState"]
__all__ += ["LM2Layer", "LM2State", "LM2Config"]
