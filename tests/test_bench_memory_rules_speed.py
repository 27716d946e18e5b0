"""benchmarks/memory_rules_speed.py: the rows it can be asked for (presets, path rows, ``preset:axis=value,...``)
and the errors for the rest; one tiny end-to-end run that times a changed preset beside Titans."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_rules_speed as bench  # noqa: E402
from mnemos.ops import RULES, MemoryRule  # noqa: E402


def test_named_rows_are_their_rules():
    assert bench.row_rule("moneta") == RULES["moneta"]
    assert bench.row_rule("lp-decay") == MemoryRule(loss="lp", p=3.0)
    assert bench.row_rule("atlas-formed") == bench.row_rule("atlas-rowspace") == RULES["atlas"]


def test_a_preset_with_changed_axes():
    assert bench.row_rule("atlas:ns_steps=1,window=1") == replace(RULES["atlas"], ns_steps=1, window=1)
    assert bench.row_rule("moneta: p=2.5") == replace(RULES["moneta"], p=2.5)
    assert bench.row_rule("titans:loss=huber") == RULES["yaad"]


@pytest.mark.parametrize("name, words", [
    ("nope", "unknown row 'nope'"),
    ("lp-decay:window=2", "unknown row"),  # only presets take changes
    ("atlas:foo=1", "axis=value with an axis of"),
    ("atlas:ns_steps", "axis=value with an axis of"),
    ("atlas:ns_steps=-1", "ns_steps must be an int >= 0"),
    ("atlas:loss=l3", "loss must be one of"),
])
def test_bad_rows_name_the_row_and_what_is_accepted(name, words):
    with pytest.raises(ValueError, match="--rules") as e:
        bench.row_rule(name)
    assert words in str(e.value)


def test_a_changed_preset_is_timed_beside_titans(tmp_path):
    out = tmp_path / "rules.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_rules_speed.py"), "--rules", "atlas:ns_steps=0,window=2",
         "--batch", "1", "--seq-len", "8", "--dim", "16", "--heads", "2", "--chunk", "4", "--repeats", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["rule"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"titans", "atlas:ns_steps=0,window=2"}
    assert rows["atlas:ns_steps=0,window=2"]["axes"] == "optimizer='muon', ns_steps=0, window=2"
    assert rows["titans"]["fwdbwd_ratio"] == 1.0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_rules_speed.py"), "--rules", "atlas:x=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "axis=value" in bad.stderr
