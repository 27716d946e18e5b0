"""benchmarks/gpu_session.sh, the one device call a session lent a GPU runs: it must not fail there on something a CPU
can catch (device time is short), so the rows it names must exist and the shell must parse."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("module", ["op_speed", "layer_speed"])
def test_every_row_it_names_exists(module):
    bench = __import__(module).BENCH
    text = SCRIPT.read_text()
    calls = list(re.finditer(rf"benchmarks/{module}\.py(.*?)--only(.*?)--out", text, re.S))
    assert calls, f"gpu_session.sh no longer runs {module}.py with --only ... --out"
    for call in calls:
        names = call.group(2).replace("\\", " ").split()
        assert names, module
        assert set(names) <= set(bench.impls) | set(bench.aliases), set(names) - set(bench.impls)


def test_op_speed_prints_a_table_when_every_row_is_skipped(tmp_path, monkeypatch):
    """The precision steps run only Triton rows; on a CPU without the interpreter (the dry run) all of them are
    skipped, and the table must still print with the reasons instead of crashing."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "op.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "op_speed.py"), "--device", "cpu", "--batch", "1", "--seq-len", "32",
         "--dim", "32", "--heads", "2", "--chunk-size", "8", "--warmup", "1", "--repeats", "1", "--no-cpu-memory",
         "--only", "op-triton-d2", "op-triton-d1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipped: Triton kernels need CUDA") == 2
    assert out.exists()


@pytest.mark.triton
def test_triton_precision_reports_every_row(tmp_path):
    """benchmarks/triton_precision.py (the GPU session's accuracy step) on a CPU under the interpreter, where the
    precision is ignored: every row is float32-exact against the float64 reference, so each must be within the
    tests' tolerance, and a row the tolerance check got wrong would show here."""
    pytest.importorskip("triton")
    out = tmp_path / "prec.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_precision.py"), "--device", "cpu", "--batch", "1",
         "--seq-len", "23", "--heads", "1", "--head-dim", "16", "--expansion", "2", "--depth", "2", "--dtype",
         "float32", "--precisions", "ieee", "tf32", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = __import__("json").loads(out.read_text())["rows"]
    assert [(r["depth"], r["dtype"], r["precision"]) for r in rows] == [(2, "float32", "ieee"), (2, "float32", "tf32")]
    for r in rows:
        assert r["within_test_tolerance"] and max(r["errors"].values()) < 1e-5, r
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_precision.py"), "--precisions", "fp8"],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                            "TRITON_INTERPRET": "1"})
    assert bad.returncode == 2 and "--precisions" in bad.stderr


def test_the_script_writes_at_most_eight_files():
    """The device tool brings back at most 8 files from $OUT: the step logs ($OUT/NAME.log, one per step name), env.txt
    and every JSON written under $OUT must fit (a ninth would be left out, silently, on the device)."""
    text = SCRIPT.read_text()
    logs = set(re.findall(r"^(?:APPEND=1 )?step (\w+) ", text, re.M))
    jsons = set(re.findall(r'--out "\$OUT/([^"]+)"', text))
    assert logs >= {"tests", "op_speed", "layer_speed"} and jsons, (logs, jsons)
    assert '"$OUT/env.txt"' in text
    assert len(logs) + len(jsons) + 1 <= 8, sorted(logs) + sorted(jsons)
