"""The memory rule of a test-time-trained neural memory, in three forms with one signature.

- :func:`neural_memory_reference`: token by token, plain; the truth (reference.py).
- :func:`neural_memory_chunked`: chunk-parallel dual form with the chunk loop in PyTorch; CPU and CUDA (chunked.py,
  the driver; torch_scan.py, the loop and its backward).
- :func:`neural_memory_triton`: the same with the chunk loop in fused Triton kernels (dispatch.py; the kernels:
  triton_scan.py, triton_d1.py, triton_d2.py; whether they can run: backends.py).
- :func:`neural_memory`: the entry point; picks an implementation for the inputs' device and rule (dispatch.py).

The rule's axes (loss, retention, inner optimiser, Omega window) and their presets: :class:`MemoryRule`,
:data:`RULES`, :func:`effective_weights` (rule.py); the reference and the chunked torch path implement every axis
(the retentions lq / kl and Muon in dense_scan.py), the Triton kernels Titans'.

:func:`step_curvature` (chunked.py) measures how far a step moves the memory's answer; ``normalize_step`` divides by it.
"""

from .common import MemoryState, memory_read
from .chunked import neural_memory_chunked, step_curvature
from .reference import neural_memory_reference
from .dispatch import neural_memory, neural_memory_triton
from .rule import RULES, MemoryRule, chunked_unsupported_reason, effective_weights, torch_unsupported_reason

__all__ = ["neural_memory", "neural_memory_chunked", "neural_memory_reference", "neural_memory_triton", "memory_read", "MemoryState",
           "step_curvature", "MemoryRule", "RULES", "effective_weights", "chunked_unsupported_reason",
           "torch_unsupported_reason"]
