"""Session-wide test setup.

Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton decides between compiling and
interpreting when a kernel is defined and caches parts of that choice when it is first imported, which any test may
trigger indirectly (transformers and torch import it when present), so the switch is set here, before any test
module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
