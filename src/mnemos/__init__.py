"""mnemos: the memory hierarchy of sequence models.

Long-term memory (a neural memory trained at test time: Titans and its family), short-term memory (attention with a
managed KV cache) and persistent memory (learned input-independent tokens), in PyTorch, exact on CPU and fast on GPU.
"""

__version__ = "0.1.0"
