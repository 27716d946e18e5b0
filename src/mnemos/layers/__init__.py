"""Layers: the Titans neural-memory layer (long-term), attention with a KV cache (short-term), short convolution,
norms and rotary embeddings."""

from .attention import Attention, causal_attention, causal_attention_reference
from .conv import QK_INITS, ShortConvolution, successor_init_
from .kv_cache import FullKVCache, KVCache, RollingKVCache
from .neural_memory import MemorySettings, NeuralMemory, NeuralMemoryState
from .norm import GatedRMSNorm, RMSNorm
from .rope import RotaryEmbedding

__all__ = [
    "NeuralMemory", "NeuralMemoryState", "MemorySettings", "Attention", "causal_attention", "causal_attention_reference",
    "KVCache", "FullKVCache", "RollingKVCache", "ShortConvolution", "successor_init_", "QK_INITS", "RMSNorm", "GatedRMSNorm", "RotaryEmbedding",
]
