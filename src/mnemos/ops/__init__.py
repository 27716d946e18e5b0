"""Sequence-mixing operators. Everything here imports nothing from the rest of mnemos."""

from .memory_rule import MemoryState, memory_read, neural_memory, neural_memory_chunked, neural_memory_reference

__all__ = ["neural_memory", "neural_memory_chunked", "neural_memory_reference", "memory_read", "MemoryState"]
