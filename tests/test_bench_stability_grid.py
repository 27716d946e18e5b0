"""benchmarks/stability_grid.py end to end on one tiny run: the run's own CPU time recorded, a directory that can be
committed (its .gitignore), and a second invocation that trains nothing."""

import json
import sys
from pathlib import Path

import pytest

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
    assert row["val_chance"] > 0 and row["val_any_value_level"] > row["val_chance"]
    assert (f"mqar: chance {row['val_chance']:.3g}, any context value 1/K {row['val_any_value_level']:.3g}"
            in (tmp_path / "grid.md").read_text())
    mtime = (tmp_path / run["name"] / "metrics.jsonl").stat().st_mtime_ns
    stability_grid.main()  # resumable: the finished run is read back, not trained again
    assert (tmp_path / run["name"] / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_the_deadline_stops_starting_and_kills_late_runs_which_run_again_next_time(tmp_path, monkeypatch):
    """--deadline (a grid sized to a GPU lease): past it no run starts, past it + --grace the running ones are killed
    and left unfinished; the next invocation trains them (and only them) from scratch. The run order is lr-major so a
    cut grid holds whole (lr, seed) slices."""
    runs = [dict(name=f"mqar-lmm-d1-c4-lr0.01-s{s}", preset="mqar", variant="lmm", depth=1, chunk=4, lr=0.01, seed=s,
                 steps=10) for s in (0, 1)]
    monkeypatch.setattr(stability_grid, "grid", lambda *args: [dict(r) for r in runs])
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--deadline", "0.5", "--grace",
                                      "0", "--device", "cpu"])
    assert stability_grid.main() == 0  # runs cut by the deadline are unfinished, not failed
    first = json.loads((tmp_path / runs[0]["name"] / stability_grid.RECORD).read_text())
    assert first["returncode"] != 0  # killed mid-run
    assert not (tmp_path / runs[1]["name"]).exists()  # never started
    assert "0 of 2 runs finished" in (tmp_path / "grid.md").read_text()
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--jobs", "3", "--device", "cpu"])
    assert stability_grid.main() == 0
    rows = json.loads((tmp_path / "grid.json").read_text())
    assert [r["passed"] for r in rows] == [True, True] and {r["device"] for r in rows} == {"cpu"}
    assert "Trained on: cpu (2 runs)" in (tmp_path / "grid.md").read_text()


def test_the_grid_is_ordered_lr_by_lr_then_seed_by_seed():
    runs = stability_grid.grid(False, [1e-2, 1e-3], [0, 1], ["mqar", "lm"])
    assert len(runs) == 2 * 2 * 2 * len(stability_grid.VARIANTS) * len(stability_grid.MEMORIES)
    slices = [(r["lr"], r["seed"]) for r in runs]
    assert slices == sorted(slices, key=lambda x: ([1e-2, 1e-3].index(x[0]), x[1]))
    assert len({r["name"] for r in runs}) == len(runs)


def test_memories_keeps_only_the_listed_points_and_rejects_a_bad_one(tmp_path, monkeypatch, capsys):
    runs = stability_grid.grid(False, [1e-2], [0], ["mqar", "lm"], [(2, 1)])
    assert len(runs) == 2 * len(stability_grid.VARIANTS)
    assert {(r["depth"], r["chunk"]) for r in runs} == {(2, 1)} and {r["preset"] for r in runs} == {"mqar", "lm"}
    assert {r["name"] for r in runs} <= {r["name"] for r in stability_grid.grid(False, [1e-2], [0], ["mqar", "lm"])}
    for bad in ("2x1", "4:16", "2:0"):
        monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--memories", bad])
        with pytest.raises(SystemExit):
            stability_grid.main()
        assert "--memories takes DEPTH:CHUNK" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written for a refused command


def test_max_crashes_stops_a_grid_whose_runs_all_fail(tmp_path, monkeypatch):
    """A run that exits with an error counts as a crash; after --max-crashes of them no run starts (on a leased GPU a
    broken install would otherwise spend the lease failing run after run)."""
    runs = [dict(name=f"mqar-lmm-d1-c4-lr0.01-s{s}", preset="mqar", variant="lmm", depth=1, chunk=4, lr=0.01, seed=s,
                 steps=10) for s in range(4)]
    monkeypatch.setattr(stability_grid, "grid", lambda *args: [dict(r) for r in runs])
    real = stability_grid.command
    monkeypatch.setattr(stability_grid, "command",
                        lambda r, out, device="auto": real(r, out, device) + ["model.no_such_key=1"])  # fails at once
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--max-crashes", "2",
                                      "--device", "cpu"])
    assert stability_grid.main() == 1
    started = [r["name"] for r in runs if (tmp_path / r["name"]).exists()]
    assert started == [runs[0]["name"], runs[1]["name"]]
    assert "no_such_key" in (tmp_path / runs[0]["name"] / "train.log").read_text()


def test_sample_draws_a_fixed_subset_and_the_table_keeps_earlier_runs(tmp_path, monkeypatch):
    """--sample N: N configurations of the grid, the same for the same --sample-seed, in the grid's order; the table
    of a directory covers the runs an earlier invocation made with other options (a record without the run, from
    before runs were written into records, is read from its name)."""
    full = stability_grid.grid(False, [1e-2, 1e-3], [0, 1], ["mqar", "lm"])
    order = {r["name"]: i for i, r in enumerate(full)}
    picked = []
    for _ in range(2):
        monkeypatch.setattr(stability_grid, "summarise", lambda r, out: picked.append(r["name"]) or
                            {**r, "passed": True, "skipped_steps": 0, "inner_rose_at": [], "worst_inner_ratio": 0.5,
                             "max_curvature": 1.0, "final_val_accuracy": None, "cpu_s": 1.0, "device": "cpu"})
        monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--lrs", "0.01", "0.001",
                                          "--seeds", "0", "1", "--sample", "7", "--sample-seed", "3"])
        assert stability_grid.main() == 0
    first, second = picked[:len(picked) // 2], picked[len(picked) // 2:]
    drawn = list(dict.fromkeys(first))
    assert len(drawn) == 7 and first == second and [order[n] for n in drawn] == sorted(order[n] for n in drawn)
    # an earlier run outside this invocation's selection, its record without the run (the old format)
    old = full[0]["name"] if full[0]["name"] not in drawn else full[1]["name"]
    (tmp_path / old).mkdir()
    (tmp_path / old / stability_grid.RECORD).write_text(json.dumps({"cpu_s": 1.0}))
    assert stability_grid.parse_name(old)["name"] == old
    assert stability_grid.parse_name("mqar-lmm-d2-c4-lr0.01-s0-steps10")["steps"] == 10
    assert stability_grid.parse_name("mqar-transformer-d2-c4-lr0.01-s0") is None
    picked.clear()
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--sample", "1", "--lrs", "0.01",
                                      "--seeds", "0"])
    stability_grid.main()
    assert old in picked and str(len(set(picked))) + " of " + str(len(set(picked))) in (tmp_path / "grid.md").read_text()
    bad = ["stability_grid.py", "--out", str(tmp_path), "--sample", "0"]
    monkeypatch.setattr(sys, "argv", bad)
    with pytest.raises(SystemExit):
        stability_grid.main()


def test_report_only_trains_nothing_and_lists_unfinished_runs(tmp_path, monkeypatch):
    runs = [dict(name=f"mqar-lmm-d1-c4-lr0.01-s{s}", preset="mqar", variant="lmm", depth=1, chunk=4, lr=0.01, seed=s,
                 steps=10) for s in (0, 1)]
    monkeypatch.setattr(stability_grid, "grid", lambda *args: [dict(r) for r in runs])
    monkeypatch.setattr(stability_grid.subprocess, "Popen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--report-only"])
    assert stability_grid.main() == 0  # nothing failed: two runs not finished
    table = (tmp_path / "grid.md").read_text()
    assert "0 of 2 runs finished" in table and table.count("not finished") == 2


def test_a_run_that_diverges_is_a_failure_not_an_unfinished_run(tmp_path, monkeypatch):
    """The trainer stops a diverging run (10 skipped steps in a row) with an error before its last step; the grid must
    count that run as failed, say where it ended, and not run it again, while a run stopped by a signal stays
    unfinished (the deadline test above)."""
    run = dict(name="mqar-lmm-d1-c4-lr0.01-s0", preset="mqar", variant="lmm", depth=1, chunk=4, lr=0.01, seed=0,
               steps=40)
    monkeypatch.setattr(stability_grid, "grid", lambda *args: [dict(run)])
    real = stability_grid.command
    monkeypatch.setattr(stability_grid, "command", lambda r, out, device="auto": real(r, out, device) + [
        "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0"])  # the first update overflows every weight
    monkeypatch.setattr(sys, "argv", ["stability_grid.py", "--out", str(tmp_path), "--device", "cpu"])
    assert stability_grid.main() == 1
    assert "training diverged" in (tmp_path / run["name"] / "train.log").read_text()
    (row,) = json.loads((tmp_path / "grid.json").read_text())
    assert row["passed"] is False and row["ended_early"]["exit_code"] > 0 and row["ended_early"]["step"] < 40
    table = (tmp_path / "grid.md").read_text()
    assert "0 of 1 runs finished, 0 passed; 1 ended early" in table and "**no**" in table
    mtime = (tmp_path / run["name"] / stability_grid.RECORD).stat().st_mtime_ns
    assert stability_grid.main() == 1  # the failure stands: not trained again
    assert (tmp_path / run["name"] / stability_grid.RECORD).stat().st_mtime_ns == mtime
