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


def test_the_rules_it_names_exist():
    from memory_rules_speed import EXTRA, PATHS
    from mnemos.ops import RULES

    call = re.search(r"benchmarks/memory_rules_speed\.py(.*?)--rules(.*?)--out", SCRIPT.read_text(), re.S)
    assert call, "gpu_session.sh no longer runs memory_rules_speed.py with --rules ... --out"
    names = call.group(2).replace("\\", " ").split()
    assert {"atlas-formed", "atlas-rowspace"} <= set(names) <= set(RULES) | set(EXTRA) | set(PATHS), names


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


def _check_only(parts: str | None) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "GPU_SESSION_CHECK_ONLY": "1", "GPU_SESSION_DRY": "1", "PYTHON": sys.executable}
    env.pop("GPU_SESSION_PARTS", None)
    if parts is not None:
        env["GPU_SESSION_PARTS"] = parts
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_plans_fit_the_eight_files_the_device_tool_brings_back():
    """The device tool brings back at most 8 files from $OUT: the script declares each part's files and refuses a
    selection of parts that would write more, before anything runs. Every file the script writes under $OUT must be
    declared (a log of `step NAME`, a `--out "$OUT/..."`, the grid's tarball), or the count would be wrong."""
    text = SCRIPT.read_text()
    declared = set(" ".join(re.findall(r'\[\w+\]="([^"]+)"', text)).replace("$DEVICE", "cuda").split())
    logs = {f"{n}.log" for n in re.findall(r"^\s*(?:want \w+ && )?(?:APPEND=1 )?step (\w+) ", text, re.M)}
    outs = {f.replace("$DEVICE", "cuda") for f in re.findall(r'"\$OUT/([^"$]+(?:\$DEVICE[^"]*)?)"', text)}
    assert logs >= {"tests.log", "op_speed.log", "layer_speed.log", "grid.log"}, logs
    assert (logs | outs) - {"env.txt"} <= declared, (logs | outs) - declared - {"env.txt"}
    assert "grid.tar.gz" in outs and "triton_precision-cuda.json" in outs, outs
    default = _check_only(None)
    assert default.returncode == 0 and "(8 files)" in default.stdout, default.stdout + default.stderr
    grid = _check_only("precision grid chunks fla")
    assert grid.returncode == 0 and "(6 files)" in grid.stdout, grid.stdout + grid.stderr
    too_many = _check_only("tests op_speed layer precision grid")
    assert too_many.returncode == 2 and "would write 10 files" in too_many.stderr, too_many.stderr
    unknown = _check_only("tests grdi")
    assert unknown.returncode == 2 and "unknown part 'grdi'" in unknown.stderr, unknown.stderr
