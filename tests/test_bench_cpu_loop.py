"""benchmarks/cpu_loop_speed.py runs end to end at a tiny shape and prints one row per shape and pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mnemos.ops.memory_rule import cpu_scan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(cpu_scan.unavailable_reason() is not None, reason="the compiled loop is unavailable here")
def test_cpu_loop_speed_prints_a_row_per_shape_and_pass(capsys):
    spec = importlib.util.spec_from_file_location("cpu_loop_speed", ROOT / "benchmarks" / "cpu_loop_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--shapes", "2x9x4", "3x5x2", "--repeats", "1", "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "×" in ln]
    assert [r.split("|")[1:3] for r in rows] == [[" 2 x 9, C 4 ", " fwd "], [" 2 x 9, C 4 ", " fwd+bwd "],
                                                 [" 3 x 5, C 2 ", " fwd "], [" 3 x 5, C 2 ", " fwd+bwd "]]


@pytest.mark.skipif(cpu_scan.unavailable_reason() is not None, reason="compiled loop unavailable")
@pytest.mark.parametrize("against", [["--against", "kept-starts"], ["--against-source", None]])
def test_cpu_loop_speed_compares_the_compiled_loop_with_itself(against, capsys, tmp_path):
    """The A/B modes: kept against found segment starts, and this source against another build (here a copy of it):
    one row per shape and pass under their own headings, and the module's library and budget as they were after."""
    spec = importlib.util.spec_from_file_location("cpu_loop_speed", ROOT / "benchmarks" / "cpu_loop_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if against[1] is None:
        copy = tmp_path / "other_scan.cpp"
        copy.write_text(cpu_scan.SOURCE.read_text())
        against = [against[0], str(copy)]
    library, budget, source = cpu_scan.library(), cpu_scan.SAVED_BOUNDS_BYTES, cpu_scan.SOURCE
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--shapes", "2x40x1", "--depth", "1", "--repeats", "1", "--threads", "1", *against]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert ("starts kept ms" in out) if against[0] == "--against" else ("other_scan.cpp ms" in out)
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "×" in ln]
    assert [r.split("|")[2] for r in rows] == [" fwd ", " fwd+bwd "]
    assert cpu_scan.library() is library and cpu_scan.SAVED_BOUNDS_BYTES == budget and cpu_scan.SOURCE == source
