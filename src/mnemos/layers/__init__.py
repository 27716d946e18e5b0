"""Layers: the Titans neural-memory layer, short convolution, norms (attention and KV caches join here)."""

from .conv import ShortConvolution
from .neural_memory import NeuralMemory, NeuralMemoryState
from .norm import GatedRMSNorm, RMSNorm

__all__ = ["NeuralMemory", "NeuralMemoryState", "ShortConvolution", "RMSNorm", "GatedRMSNorm"]
