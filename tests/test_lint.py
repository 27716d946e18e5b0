"""The static checks of pyproject.toml's ``[tool.ruff.lint]`` over the library, the benchmarks and the tests:
pyflakes' findings (an undefined name in a branch no test reaches, unused imports and variables), syntax errors, and
every ``zip()`` saying whether its arguments must be equally long. A comparison written ``for a, b in zip(want, got)``
stops at the shorter list, so a fast path that lost a gradient would still pass it; ``strict=True`` makes it fail."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("ruff")  # in the [test] extra, so CI runs these


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_sources_pass_the_static_checks():
    r = ruff("src", "benchmarks", "tests")
    assert r.returncode == 0, f"ruff check src benchmarks tests:\n{r.stdout}{r.stderr}"


def test_the_checks_catch_a_silent_zip_and_an_undefined_name(tmp_path):
    # the project's settings (not ruff's defaults, which leave B905 off) applied to a file that breaks both rules
    bad = tmp_path / "bad.py"
    bad.write_text("def compare(want, got):\n    return all(a == b for a, b in zip(want, got)) and missing\n")
    r = ruff("--config", str(ROOT / "pyproject.toml"), str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "B905" in r.stdout and "F821" in r.stdout, r.stdout
