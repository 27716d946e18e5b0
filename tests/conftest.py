"""Session-wide test setup.

Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton decides between compiling and
interpreting when a kernel is defined and caches parts of that choice when it is first imported, which any test may
trigger indirectly (transformers and torch import it when present), so the switch is set here, before any test
module is imported.

README's test command runs the suite on every core with pytest-xdist (``-n auto --dist worksteal``): each worker gets
its share of the cores' threads, and the longest test starts first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def worker_threads() -> int:
    """CPU threads for torch in this test process: the cores shared evenly among pytest-xdist's workers (README's test
    command runs ``-n auto``: one worker per core), all of them without xdist."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ:  # two workers with a thread per core each would oversubscribe the cores
    torch.set_num_threads(worker_threads())


def pytest_collection_modifyitems(items):
    """Longest first: the tests marked ``longest`` (the demo's, 6-7 minutes on one core) start at once, so that in a
    parallel run (``-n auto --dist worksteal``) the other workers run everything else beside them."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: the rest keep their order


@pytest.fixture
def share_of_cores():
    """Torch threads as a command run by hand gets them (one per core) for this worker's share of the cores, whatever
    thread count other test modules set for themselves when imported (several set 1); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads())
    yield torch.get_num_threads()
    torch.set_num_threads(before)
