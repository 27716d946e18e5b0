"""The trainer's notice on CUDA when a memory layer misses the Triton kernels (a rule beyond Titans' axes, depth 3, a
chunk above 64): the reasons are the layer's own, computed without a GPU, so they are checked here."""

import pytest
import torch

from mnemos.layers import NeuralMemory
from mnemos.models import MemoryConfig, MnemosConfig, MnemosLM
from mnemos.ops.memory_rule.backends import HAS_TRITON
from mnemos.train.loop import kernels_notice

CUDA = torch.device("cuda")  # a device name only: nothing is allocated on it


def _model(variant="mag", **memory):
    return MnemosLM(MnemosConfig(variant=variant, vocab_size=32, d_model=64, n_layers=2, n_heads=4, window=8,
                                 memory=MemoryConfig(**memory)))


def test_no_notice_on_the_cpu_or_without_memory_layers():
    assert kernels_notice(_model(), torch.device("cpu")) is None
    assert kernels_notice(_model("transformer"), CUDA) is None


@pytest.mark.skipif(not HAS_TRITON, reason="without triton every reason is 'triton is not installed'")
def test_the_defaults_take_the_kernels_and_what_misses_them_is_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU machine
    assert kernels_notice(_model(), CUDA) is None  # chunk 4: padded to the kernels' 16-token tile
    assert kernels_notice(_model("lmm", chunk_size=64, depth=1), CUDA) is None
    notice = kernels_notice(_model(depth=3), CUDA)
    assert notice is not None and "2 memory layer(s)" in notice and "got depth 3" in notice
    notice = kernels_notice(_model(chunk_size=128), CUDA)
    assert notice is not None and "chunk_size in 1..64, got 128" in notice


def test_the_reasons_are_the_layers_own(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = NeuralMemory(64, heads=4, chunk_size=16, impl="torch")
    assert layer.kernels_unsupported_reason("cuda") == "impl='torch'"
    assert "CUDA" in NeuralMemory(64, heads=4, chunk_size=16).kernels_unsupported_reason("cpu") or not HAS_TRITON
    depth3 = NeuralMemory(64, heads=4, chunk_size=16, depth=3).kernels_unsupported_reason("cuda")
    assert ("depth 1 and 2, got depth 3" in depth3) if HAS_TRITON else "triton" in depth3
    moneta = NeuralMemory(64, heads=4, chunk_size=16, rule="moneta").kernels_unsupported_reason("cuda")
    assert moneta is not None and "retention" in moneta
    notice = kernels_notice(_model(rule="moneta"), CUDA)
    assert notice is not None and "retention" in notice


def test_the_opt_out_is_named_for_auto_and_not_for_an_explicit_impl(monkeypatch):
    """``MNEMOS_TRITON=0`` keeps impl="auto" on the torch path (ops.neural_memory); the layer's reason says so, so
    the trainer's notice on CUDA names it, while impl="triton" (which the variable does not touch) is unaffected."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MNEMOS_TRITON", "0")
    assert "MNEMOS_TRITON=0" in NeuralMemory(64, heads=4, chunk_size=16).kernels_unsupported_reason("cuda")
    notice = kernels_notice(_model(), CUDA)
    assert notice is not None and "MNEMOS_TRITON=0" in notice
    explicit = NeuralMemory(64, heads=4, chunk_size=16, impl="triton").kernels_unsupported_reason("cuda")
    assert explicit is None or "MNEMOS_TRITON" not in explicit
    monkeypatch.setenv("MNEMOS_TRITON", "1")
    assert "MNEMOS_TRITON" not in (NeuralMemory(64, heads=4, chunk_size=16).kernels_unsupported_reason("cuda") or "")
