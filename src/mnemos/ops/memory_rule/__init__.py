"""The memory rule of a test-time-trained neural memory, in three forms with one signature.

- :func:`neural_memory_reference`: token by token, plain; the truth (reference.py).
- :func:`neural_memory_chunked`: chunk-parallel dual form in PyTorch; CPU and CUDA (chunked.py).
- :func:`neural_memory_triton`: the same with the chunk loop in fused Triton kernels (triton_scan.py).
- :func:`neural_memory`: the entry point; picks an implementation for the inputs' device.
"""

from .common import MemoryState, memory_read
from .chunked import neural_memory_chunked, neural_memory_triton, step_curvature
from .reference import neural_memory_reference
from .dispatch import neural_memory

__all__ = ["neural_memory", "neural_memory_chunked", "neural_memory_reference", "neural_memory_triton", "memory_read", "MemoryState",
           "step_curvature"]
