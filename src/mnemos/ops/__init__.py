"""Sequence-mixing operators. Everything here imports nothing from the rest of mnemos."""

from .memory_rule import (RULES, MemoryRule, MemoryState, effective_weights, memory_read, neural_memory, neural_memory_chunked,
                          neural_memory_reference, neural_memory_triton, step_curvature)
from .delta_rule import delta_rule, delta_rule_reference
from .ssd import ssd, ssd_reference
from .based import based_linear_attention, based_linear_attention_reference, taylor_feature_map

__all__ = ["neural_memory", "neural_memory_chunked", "neural_memory_reference", "neural_memory_triton", "memory_read", "MemoryState", "step_curvature",
           "MemoryRule", "RULES", "effective_weights",
           "delta_rule", "delta_rule_reference"]
__all__ += ["ssd", "ssd_reference", "based_linear_attention", "based_linear_attention_reference",
            "taylor_feature_map"]
