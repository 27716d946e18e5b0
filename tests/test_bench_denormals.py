"""The speed benchmarks' ``--denormals`` flag (benchmarks/speed_common.py): subnormal floats flushed to zero by
default, kept on request, in the scripts built on speed_common and in memory_rules_speed.py."""

import argparse
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speed_common  # noqa: E402

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(autouse=True)
def restore():
    yield
    torch.set_flush_denormal(False)  # the process default


@pytest.mark.skipif(not X86, reason="torch.set_flush_denormal needs SSE3 (x86)")
def test_flush_makes_subnormal_results_zero_and_keep_does_not():
    tiny = torch.tensor([1e-30], dtype=torch.float32)
    assert speed_common.set_denormals("flush") is True
    assert (tiny * 1e-10).item() == 0.0  # 1e-40 is subnormal in float32: flushed
    assert speed_common.set_denormals("keep") is False
    assert (tiny * 1e-10).item() != 0.0


def test_the_flag_defaults_to_flush_and_takes_only_its_two_values():
    p = argparse.ArgumentParser()
    speed_common.add_denormals_flag(p)
    assert p.parse_args([]).denormals == "flush"
    assert p.parse_args(["--denormals", "keep"]).denormals == "keep"
    with pytest.raises(SystemExit):
        p.parse_args(["--denormals", "zero"])
