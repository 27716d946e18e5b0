"""benchmarks/stability_grid.py end to end on one tiny run: the run's own CPU time recorded, a directory that can be
committed (its .gitignore), and a second invocation that trains nothing."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import stability_grid  # noqa: E402


def test_one_tiny_run_records_its_cpu_time_and_is_not_run_again(tmp_path, monkeypatch):
    run = dict(name="mqar-lmm-d1-c4-lr0.01-s0", preset="mqar", variant="lmm", depth=1, chunk=4, lr=0.01, seed=0,
               steps=10)  # the last step is logged (run.log_every 10)
    monkeypatch.setattr(stability_grid, "grid", lambda *args: [dict(run)])
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path)])
    stability_grid.main()
    record = json.loads((tmp_path / run["name"] / stability_grid.RECORD).read_text())
    assert record["returncode"] == 0 and record["cpu_s"] > 0 and record["wall_s"] > 0
    (row,) = json.loads((tmp_path / "grid.json").read_text())
    assert row["cpu_s"] == record["cpu_s"] and row["steps"] == 10 and row["skipped_steps"] == 0
    assert (tmp_path / ".gitignore").read_text() == stability_grid.GRID_GITIGNORE
    assert "1 of 1 runs finished" in (tmp_path / "grid.md").read_text()
    mtime = (tmp_path / run["name"] / "metrics.jsonl").stat().st_mtime_ns
    stability_grid.main()  # resumable: the finished run is read back, not trained again
    assert (tmp_path / run["name"] / "metrics.jsonl").stat().st_mtime_ns == mtime
