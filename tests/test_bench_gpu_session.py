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
    call = re.search(rf"benchmarks/{module}\.py(.*?)--only(.*?)--out", text, re.S)
    assert call, f"gpu_session.sh no longer runs {module}.py with --only ... --out"
    names = call.group(2).replace("\\", " ").split()
    assert names, module
    assert set(names) <= set(bench.impls) | set(bench.aliases), set(names) - set(bench.impls)
