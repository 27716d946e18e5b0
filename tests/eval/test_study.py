"""``mnemos study recall`` at its tiny size: train -> eval -> report end to end, a second invocation that trains
nothing and rebuilds the report, a removed run redone, a run killed part-way resumed from its checkpoint, two
trainings at a time in subprocesses, and the command's errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import pytest

from mnemos.cli import main
from mnemos.eval.study import RECORD, STUDY_MEMORY, plan, run_study, study_settings

TINY = study_settings("tiny")


def _mtimes(out, names):
    return {n: (out / "runs" / n / "checkpoint" / "trainer.pt").stat().st_mtime_ns for n in names}


def test_tiny_study_runs_resumes_and_redoes_a_removed_run(tmp_path):
    trains, evals = plan(TINY)
    log = io.StringIO()
    first = run_study(TINY, tmp_path, file=log)
    assert sorted(first["trained"]) == sorted(t.name for t in trains) and not first["failed"]
    assert sorted(first["evaluated"]) == sorted(e.name for e in evals)
    for name in ("report.md", "results.json", "study.json", "curves.png", "extrapolation.png"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    for heading in ("# Recall study (tiny)", "## Targets (issue 12)", "best outer lr", "## Length extrapolation", "## Runs",
                    "### MQAR", "### S-NIAH (passkey)", "### Passkey state capacity"):
        assert heading in report, heading
    assert f"{len(trains)}/{len(trains)} runs finished" in report
    study = json.loads((tmp_path / "study.json").read_text())
    assert all(r["status"] == "done" and r["cpu_s"] > 0 for r in study["runs"].values())
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    labels = {c["model"]["name"] for c in cells}
    # seeds and runs pool under the study's labels; the passkey model's fine-tuning stage has its own row
    assert labels == {"gated_deltanet", "lmm-d2", "gated_deltanet-carry2"}
    assert {c["task_config"]["noise"] for c in cells if c["task"] == "mqar" and c["params"]["seq_len"] == 64} == \
        {"disjoint"}  # extrapolation beyond the training vocabulary's reach
    lines = log.getvalue().splitlines()
    assert any(line.startswith("study [") and f"1/{len(trains) + len(evals)} train" in line for line in lines)

    # a second invocation trains and evaluates nothing, and rebuilds the report
    before = _mtimes(tmp_path, [t.name for t in trains])
    (tmp_path / "report.md").unlink()
    second = run_study(TINY, tmp_path, file=io.StringIO())
    assert second["trained"] == [] and second["evaluated"] == [] and not second["failed"]
    assert _mtimes(tmp_path, [t.name for t in trains]) == before
    assert (tmp_path / "report.md").read_text().startswith("# Recall study (tiny)")

    # a removed run is trained again; one thread and the same seed give the same weights, so its evaluations stand
    gone = "passkey-gated_deltanet"
    shutil.rmtree(tmp_path / "runs" / gone)
    third = run_study(TINY, tmp_path, file=io.StringIO())
    assert third["trained"] == [gone] and third["evaluated"] == []


def test_a_run_killed_part_way_resumes_from_its_checkpoint(tmp_path):
    job = next(t for t in plan(TINY)[0] if t.group == "mqar")
    run_dir = tmp_path / "runs" / job.name
    from mnemos.train.config import TrainConfig
    from mnemos.train.loop import train

    d = json.loads(json.dumps(job.config))
    d["run"].update(out_dir=str(run_dir), progress=False, stop_after=2)  # what a kill after step 2 leaves
    train(TrainConfig.from_dict(d))
    out = run_study(TINY, tmp_path, only=job.name, file=io.StringIO())
    assert out["trained"] == [job.name]
    record = json.loads((run_dir / RECORD).read_text())
    assert record["resumed"] and record["steps"] == job.config["run"]["steps"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == job.config["run"]["steps"]
    assert run_study(TINY, tmp_path, only=job.name, file=io.StringIO())["trained"] == []  # now finished


def test_only_a_passkey_run_also_runs_its_capacity_eval(tmp_path):
    """``--only passkey-X`` picks the run's evaluations by the run they belong to: the passkey eval and
    ``capacity-X`` (whose name does not contain the run's)."""
    job = next(t for t in plan(TINY)[0] if t.group == "passkey" and t.label in TINY.capacity_models)
    out = run_study(TINY, tmp_path, only=job.name, file=io.StringIO())
    stage = f"{job.name}-carry2"  # its fine-tuning stage matches the pattern too, and comes after it
    assert out["trained"] == [job.name, stage]
    assert set(out["evaluated"]) == {job.name, f"capacity-{job.label}", stage, f"capacity-{job.label}-carry2"}, out
    assert (tmp_path / "evals" / f"capacity-{job.label}" / "results.json").is_file()
    shutil.rmtree(tmp_path / "evals" / f"capacity-{job.label}")  # a run finished before, its capacity eval missing
    out = run_study(TINY, tmp_path, only=job.name, file=io.StringIO())
    assert out["trained"] == [] and out["evaluated"] == [f"capacity-{job.label}"], out
    assert (tmp_path / "evals" / f"capacity-{job.label}" / "results.json").is_file()


def test_progress_never_counts_past_its_total(tmp_path):
    """--only naming a run at the second lr: plan() counts evals under the first lr, so the run's eval was not in
    the total; the bar must still end at i/N with i <= N and no negative ETA."""
    lrs = TINY.lrs
    job = next(t for t in plan(TINY)[0] if t.group == "mqar" and t.lr == lrs[1])
    log = io.StringIO()
    out = run_study(TINY, tmp_path, only=job.name, file=log)
    assert out["trained"] == [job.name] and out["evaluated"]
    lines = [line for line in log.getvalue().splitlines() if line.startswith("study [")]
    assert len(lines) >= 2 and " eval " in lines[-1], lines  # the training, then its evals
    for line in lines:
        done, total = map(int, line.split("] ")[1].split(" ")[0].split("/"))
        assert done <= total and "ETA -" not in line, line


def test_a_passkey_fine_tuning_stage_starts_from_its_run(tmp_path):
    """A passkey model's carried-state stage (``passkey_carry_stages``) trains on documents of several windows with
    the state carried, from its passkey run's final checkpoint, and is evaluated as its own row. Two trainings at a
    time: the stage waits for the run it starts from (started together, it would find no checkpoint and fail)."""
    out = run_study(TINY, tmp_path, jobs=2, only="passkey-gated_deltanet*", file=io.StringIO())
    stage = "passkey-gated_deltanet-carry2"
    assert out["trained"] == ["passkey-gated_deltanet", stage] and not out["failed"], out
    assert {stage, "capacity-gated_deltanet-carry2"} <= set(out["evaluated"])
    cfg = json.loads((tmp_path / "runs" / stage / "config.json").read_text())
    assert cfg["run"]["init_from"] == str(tmp_path / "runs" / "passkey-gated_deltanet" / "checkpoint")
    assert cfg["run"]["carry_state"] and cfg["task"]["doc_windows"] == 2 and cfg["run"]["steps"] == 4
    assert "run.init_from" not in (tmp_path / "runs" / stage / "train.log").read_text()  # no error about it
    cells = json.loads((tmp_path / "evals" / stage / "results.json").read_text())["cells"]
    assert cells and all(c["status"] == "ok" for c in cells)


def test_passkey_stage_settings_are_checked():
    import dataclasses

    from mnemos.eval.study import base_label, passkey_labels

    full = study_settings("full")
    assert passkey_labels(full) == ["lmm-x4", "lmm-x4-carry8", "lmm-x4-carry32", "lmm-x4-carry128", "gated_deltanet",
                                    "swa", "lmm-x1", "lmm-x4-floors", "lmm-x4-floors-p1"]
    assert [base_label(x) for x in passkey_labels(full)] == ["lmm-x4"] * 4 + ["gated_deltanet", "swa", "lmm-x1",
                                                                             "lmm-x4-floors", "lmm-x4-floors-p1"]
    assert base_label("lmm-d1-eta0-c1") == "lmm-d1-eta0-c1"
    for bad, match in ((dict(passkey_carry_models=("mag",)), "list them in passkey_models"),
                       (dict(passkey_carry_stages=()), "needs passkey_carry_stages"),
                       (dict(passkey_carry_stages=((8, 100),)), "a multiple of windows"),
                       (dict(passkey_carry_stages=((1, 100),)), "windows >= 2")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(full, **bad)


def test_two_trainings_at_a_time_in_subprocesses(tmp_path):
    out = run_study(TINY, tmp_path, jobs=2, only="mqar-*-gated_deltanet-*", file=io.StringIO())
    assert len(out["trained"]) == 2 and not out["failed"]
    for name in out["trained"]:
        record = json.loads((tmp_path / "runs" / name / RECORD).read_text())
        assert record["status"] == "done" and record["cpu_s"] > 0
        assert "task mqar" in (tmp_path / "runs" / name / "train.log").read_text()


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["study", "recall", "--jobs", "3"])
    assert "invalid choice: 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "recall", "--quick", "--tiny"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study"])
    assert "required" in capsys.readouterr().err
    assert main(["study", "recall", "--tiny", "--out", str(tmp_path), "--only", "no-such-run"]) == 2
    assert "--only 'no-such-run' matches none of the study's" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown study size"):
        study_settings("huge")
    with pytest.raises(ValueError, match="jobs must be 1 or 2"):
        run_study(TINY, tmp_path, jobs=4)


def test_the_lr_is_chosen_on_the_first_seed_and_the_other_seeds_run_at_it_only(tmp_path):
    import dataclasses

    from mnemos.eval.study import GridPoint, select_lrs, train_jobs

    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 3, 4, (0, 1)),),
                            passkey_models=(), capacity_models=(), passkey_carry_models=())
    trains, _ = plan(s)
    name = "mqar-L32-K2-gated_deltanet-lr{}-s{}".format
    # both lrs at seed 0, seed 1 at one lr (the first stands in for the choice)
    assert sorted(t.name for t in trains) == sorted([name("0.001", 0), name("0.003", 0), name("0.001", 1)])
    # plant the seed-0 outcome (a record that says the run stopped, a final val row): the second lr wins, so seed 1
    # must run at it, not at the first lr that stood in for the choice
    for t in train_jobs(s):
        if t.seed == 0:
            run_dir = tmp_path / "runs" / t.name
            run_dir.mkdir(parents=True)
            (run_dir / RECORD).write_text(json.dumps({"status": "diverged"}))
            acc = 0.9 if t.lr == 3e-3 else 0.2
            (run_dir / "metrics.jsonl").write_text(json.dumps({"split": "val", "step": 3, "val_accuracy": acc}) + "\n")
    chosen = select_lrs(s, train_jobs(s), tmp_path)[("L32-K2", "gated_deltanet")]
    assert chosen["lr"] == 3e-3 and chosen["chosen"] and chosen["settled"]  # both lrs' first seeds finished
    out = run_study(s, tmp_path, file=io.StringIO())
    assert out["trained"] == [name("0.003", 1)]  # (the planted runs have no checkpoint to evaluate)
    chosen = select_lrs(s, train_jobs(s), tmp_path)[("L32-K2", "gated_deltanet")]
    assert chosen["lr"] == 3e-3 and [r["seed"] for r in chosen["by_lr"][3e-3]] == [0, 1]
    assert "gated_deltanet-lr0.001-s1" not in (tmp_path / "report.md").read_text()  # not planned, not listed


def test_a_grid_point_with_its_own_lrs_sweeps_those(tmp_path):
    """``GridPoint.lrs``: that point trains (and chooses among) its own lrs, the others the study's; the full study
    gives every point the study's pair, 3e-3 and 1e-2."""
    import dataclasses

    from mnemos.eval.study import GridPoint, point_lrs, select_lrs, study_settings, train_jobs

    s = dataclasses.replace(TINY, models=("gated_deltanet",), passkey_models=(), capacity_models=(),
                            passkey_carry_models=(),
                            grid=(GridPoint(32, 2, 64, 3, 4), GridPoint(32, 4, 64, 3, 4, lrs=(5e-3, 2e-2))))
    assert point_lrs(s, "L32-K2") == s.lrs and point_lrs(s, "L32-K4") == (5e-3, 2e-2)
    trains, _ = plan(s)
    assert sorted(t.name for t in trains if "K4" in t.name) == [
        "mqar-L32-K4-gated_deltanet-lr0.005-s0", "mqar-L32-K4-gated_deltanet-lr0.02-s0"]
    assert {t.lr for t in trains if "K2" in t.name} == set(s.lrs)
    table = select_lrs(s, train_jobs(s), tmp_path)
    assert table[("L32-K4", "gated_deltanet")]["lr"] == 5e-3  # nothing finished: the point's first lr stands in
    assert not table[("L32-K4", "gated_deltanet")]["settled"]
    first = next(t for t in train_jobs(s) if t.point == "L32-K4" and t.lr == 5e-3 and t.seed == 0)
    run_dir = tmp_path / "runs" / first.name  # one lr finished, the other not: chosen, but not settled
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"split": "val", "step": first.config["run"]["steps"],
                                                      "val_accuracy": 0.5}) + "\n")
    entry = select_lrs(s, train_jobs(s), tmp_path)[("L32-K4", "gated_deltanet")]
    assert entry["chosen"] and entry["lr"] == 5e-3 and not entry["settled"]
    assert set(table[("L32-K4", "gated_deltanet")]["by_lr"]) == {5e-3, 2e-2}
    full = study_settings("full")
    assert {p.key: point_lrs(full, p.key) for p in full.grid} == {
        k: (3e-3, 1e-2) for k in ("L64-K4", "L64-K8", "L128-K16", "L256-K32")}


def test_a_run_that_reaches_the_accuracy_threshold_stops_and_counts_as_finished(tmp_path, monkeypatch):
    """Zoology's early stop in the study: the trainer's eval (planted: accuracy 1 from the first eval) stops the run
    at step 2 of 6; the run is finished (not retrained by the next invocation) and the report says where it stopped."""
    import dataclasses

    from mnemos.eval.study import GridPoint, finished_step
    from mnemos.train import loop

    real = loop.validate
    monkeypatch.setattr(loop, "validate", lambda *a, **k: {**real(*a, **k), "val_accuracy": 1.0})
    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 6, 4),), lrs=(1e-3,),
                            eval_every=2, passkey_models=(), capacity_models=(), passkey_carry_models=())
    (job,) = plan(s)[0]
    assert job.config["run"]["stop_at_accuracy"] == 0.99
    out = run_study(s, tmp_path, file=io.StringIO())
    assert out["trained"] == [job.name] and not out["failed"]
    record = json.loads((tmp_path / "runs" / job.name / RECORD).read_text())
    assert record["status"] == "done" and record["stopped_at_accuracy"] and record["steps"] == 2
    assert finished_step(job, tmp_path / "runs" / job.name) == 2
    assert run_study(s, tmp_path, file=io.StringIO())["trained"] == []
    report = (tmp_path / "report.md").read_text()
    assert "reached 0.99" in report and "| gated_deltanet | 1.000 | 0.001 |" in report and "| 2 | 0 | 1 |" in report


def test_the_lr_that_reaches_the_threshold_first_is_chosen(tmp_path):
    """Both lrs' runs reach 0.99 (one ran its schedule, one stopped there): the sooner one wins, even with the lower
    final accuracy; with no run reaching it the final accuracy decides."""
    import dataclasses

    from mnemos.eval.study import GridPoint, select_lrs, train_jobs

    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 8, 4),),
                            passkey_models=(), capacity_models=(), passkey_carry_models=())

    def plant(curves):
        for t in train_jobs(s):
            run_dir = tmp_path / "runs" / t.name
            run_dir.mkdir(parents=True, exist_ok=True)
            accs = curves[t.lr]
            rows = [{"split": "val", "step": 2 * (i + 1), "val_accuracy": a} for i, a in enumerate(accs)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            reached = accs[-1] >= 0.99 and rows[-1]["step"] < 8  # the trainer's stop; else a run cut short
            (run_dir / RECORD).write_text(json.dumps({"status": "done" if reached or len(rows) == 4 else "stopped",
                                                      "steps": rows[-1]["step"], "stopped_at_accuracy": reached}))
        return select_lrs(s, train_jobs(s), tmp_path)[("L32-K2", "gated_deltanet")]

    chosen = plant({1e-3: [0.2, 0.5, 0.991, 0.999], 3e-3: [0.4, 0.992]})
    assert chosen["lr"] == 3e-3 and chosen["by_lr"][3e-3][0]["reached"] == 4
    assert chosen["by_lr"][1e-3][0]["reached"] == 6
    chosen = plant({1e-3: [0.2, 0.5, 0.7, 0.8], 3e-3: [0.4, 0.5, 0.6, 0.75]})
    assert chosen["lr"] == 1e-3 and chosen["by_lr"][1e-3][0]["reached"] is None
    chosen = plant({1e-3: [0.2, 0.5, 0.7, 0.8], 3e-3: [0.4, 0.5, 0.6]})  # cut short at step 6 (a kill)
    assert chosen["lr"] == 1e-3 and chosen["by_lr"][3e-3] == []  # (not finished: it did not stop at the threshold)


def test_a_run_stopped_with_sigterm_records_the_cpu_time_it_spent(tmp_path):
    """``--jobs 2`` children: SIGTERM unwinds through train_one, which records status "stopped" and the CPU time."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    from mnemos.eval.study import GridPoint

    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 100000, 4),), lrs=(1e-3,),
                            eval_every=100000, passkey_models=(), capacity_models=(), passkey_carry_models=())
    (job,) = plan(s)[0]
    run_dir = tmp_path / "runs" / job.name
    run_dir.mkdir(parents=True)
    job.config["run"]["log_every"] = 1
    (run_dir / "job.json").write_text(json.dumps({"job": dataclasses.asdict(job), "run_dir": str(run_dir)}))
    src = str(__import__("pathlib").Path(__import__("mnemos").__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mnemos.eval.study", "--train-one", str(run_dir / "job.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.1)
        assert (run_dir / "metrics.jsonl").is_file(), "the child never logged a step"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    record = json.loads((run_dir / RECORD).read_text())
    assert record["status"] == "stopped" and record["cpu_s"] > 0.1


def test_a_run_killed_outright_keeps_the_cpu_time_of_its_heartbeats_and_resumes_adding_to_it(tmp_path, monkeypatch):
    """SIGKILL (a machine taken away) runs no handler: the record the heartbeat last wrote ("unfinished", CPU so far)
    is what survives, and the next invocation adds its own time to it rather than starting from zero."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    from mnemos.eval.study import GridPoint

    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 100000, 4),), lrs=(1e-3,),
                            eval_every=100000, passkey_models=(), capacity_models=(), passkey_carry_models=())
    (job,) = plan(s)[0]
    run_dir = tmp_path / "runs" / job.name
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text(json.dumps({"job": dataclasses.asdict(job), "run_dir": str(run_dir)}))
    src = str(__import__("pathlib").Path(__import__("mnemos").__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "MNEMOS_STUDY_HEARTBEAT_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "mnemos.eval.study", "--train-one", str(run_dir / "job.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        record = {}
        while record.get("cpu_s", 0) < 0.5 and time.time() < deadline:
            time.sleep(0.1)
            try:
                record = json.loads((run_dir / RECORD).read_text())
            except (OSError, json.JSONDecodeError):  # not written yet (never half-written: the write is a rename)
                pass
        assert record.get("status") == "unfinished", record
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    killed = json.loads((run_dir / RECORD).read_text())
    assert killed["status"] == "unfinished" and killed["cpu_s"] >= record["cpu_s"] >= 0.5
    assert not list(run_dir.glob(f".{RECORD}.*"))  # no temporary file left where it was read

    # the next invocation (here one that fails at once) resumes from a checkpoint: it adds to the killed one's time
    from mnemos.eval import study
    from mnemos.train import loop

    def failing_train(cfg, *, resume):
        raise RuntimeError("stop here")

    monkeypatch.setattr(loop, "train", failing_train)
    monkeypatch.setattr(study, "_checkpoint_step", lambda run_dir: 5)
    after = study.train_one(job, run_dir)
    assert after["status"] == "error" and after["cpu_s"] >= killed["cpu_s"]
    assert after["wall_s"] >= killed["wall_s"] and "cpu_s_lost" not in after

    # without a checkpoint the run starts over: the time before is kept apart as lost, not counted as the run's
    monkeypatch.setattr(study, "_checkpoint_step", lambda run_dir: None)
    again = study.train_one(job, run_dir)
    assert again["status"] == "error" and again["cpu_s"] < killed["cpu_s"]
    assert again["cpu_s_lost"] == pytest.approx(after["cpu_s"]) and again["wall_s_lost"] == pytest.approx(after["wall_s"])
    # ... and kept through later rewrites, added to when it starts over once more
    monkeypatch.setattr(study, "_checkpoint_step", lambda run_dir: 5)
    kept = study.train_one(job, run_dir)
    assert kept["cpu_s_lost"] == again["cpu_s_lost"] and kept["cpu_s"] >= again["cpu_s"]
    monkeypatch.setattr(study, "_checkpoint_step", lambda run_dir: None)
    twice = study.train_one(job, run_dir)
    assert twice["cpu_s_lost"] == pytest.approx(kept["cpu_s_lost"] + kept["cpu_s"])


def test_a_stopped_run_starts_no_further_runs(tmp_path, monkeypatch):
    """``--jobs 2``: once a child reports "stopped" (it got SIGTERM / Ctrl-C), the study launches nothing new."""
    import dataclasses

    from mnemos.eval import study

    started = []

    class FakeChild:  # each child "runs" at once; the first one reports that it was stopped
        def __init__(self, args, **kwargs):
            job = json.loads(open(args[-1]).read())
            started.append(job["job"]["name"])
            record = {"status": "stopped" if len(started) == 1 else "done", "cpu_s": 1.0}
            (tmp_path / "runs" / job["job"]["name"] / RECORD).write_text(json.dumps(record))
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(study.subprocess, "Popen", FakeChild)
    s = dataclasses.replace(TINY, passkey_models=(), capacity_models=(), passkey_carry_models=())
    trains = [t for t in plan(s)[0] if t.group == "mqar"]
    assert len(trains) >= 4
    done = []
    study._train_parallel(s, trains, tmp_path, jobs=2, threads=1,
                          finished=lambda j, r, w: done.append(r["status"]))
    assert len(started) == 2 and done == ["stopped", "done"]  # the two launched together; nothing after them


def test_a_run_that_has_not_finished_is_not_evaluated(tmp_path):
    """An --only subset can reach the evals while a run is part-way (another invocation is training it): its evals
    wait for it instead of scoring a half-trained checkpoint."""
    job = next(t for t in plan(TINY)[0] if t.group == "mqar" and t.lr == TINY.lrs[0])
    run_dir = tmp_path / "runs" / job.name
    from mnemos.train.config import TrainConfig
    from mnemos.train.loop import train

    d = json.loads(json.dumps(job.config))
    d["run"].update(out_dir=str(run_dir), progress=False, stop_after=2)
    train(TrainConfig.from_dict(d))
    log = io.StringIO()
    out = run_study(TINY, tmp_path, only=f"extrap-{job.name}", file=log)
    assert out["trained"] == [] and out["evaluated"] == []
    assert f"not run: {job.name} has not finished training" in log.getvalue()
    assert not (tmp_path / "evals" / f"extrap-{job.name}" / "results.json").exists()


def test_workers_keep_freed_memory_unless_the_user_says_otherwise(monkeypatch):
    from mnemos.eval.study import KEEP_FREED_MEMORY, _worker_env

    for key in KEEP_FREED_MEMORY:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = _worker_env(3)
    assert {k: env[k] for k in KEEP_FREED_MEMORY} == KEEP_FREED_MEMORY
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["MNEMOS_STUDY_THREADS"] == "3"
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[0].endswith("src") and paths[1:] == ["/elsewhere"]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's value wins
    assert _worker_env(1)["MALLOC_TRIM_THRESHOLD_"] == "0"


def test_sigterm_unwinds_inside_the_block_only():
    """``--jobs 1`` trains in the study's own process: SIGTERM there must unwind through train_one as in a child
    (a SystemExit, so the stopped run's record and CPU time are written), and leave the handler as it was."""
    import signal

    from mnemos.eval.study import _sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with _sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
    assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_settings_survive_the_round_trip_a_worker_makes():
    import dataclasses

    from mnemos.eval.study import settings_from_dict

    for size in ("full", "quick", "tiny"):
        s = study_settings(size)
        assert settings_from_dict(json.loads(json.dumps(dataclasses.asdict(s)))) == s


def test_an_eval_is_redone_when_its_checkpoint_changes_not_when_its_file_times_do(tmp_path):
    """A git checkout or a copy of the study directory gives every file a new time: an evaluation is kept while the
    checkpoint's weights and config are the ones it recorded (their sha256), and redone when they differ. One recorded
    before fingerprints falls back to the file times once and is fingerprinted then."""
    import os

    from safetensors.torch import load_file, save_file

    from mnemos.eval.study import checkpoint_fingerprint

    job = next(t for t in plan(TINY)[0] if t.group == "mqar")
    run_study(TINY, tmp_path, only=job.name, file=io.StringIO())
    where, ckpt = tmp_path / "evals" / job.name, tmp_path / "runs" / job.name / "checkpoint"
    record = lambda: json.loads((where / "study_eval.json").read_text())  # noqa: E731
    fingerprint = checkpoint_fingerprint(ckpt)
    assert record()["checkpoint_sha256"] == fingerprint and len(fingerprint) == 64
    again = lambda: sorted(run_study(TINY, tmp_path, only=job.name, file=io.StringIO())["evaluated"])  # noqa: E731
    both = sorted(e.name for e in plan(TINY)[1] if e.run == job.name)  # the run's MQAR eval and its length eval
    assert job.name in both and len(both) == 2
    # (times in the past: results newer than the study's start count as evaluated by it)
    base = (where / "results.json").stat().st_mtime - 10_000
    os.utime(where / "results.json", (base, base))
    for f in ckpt.iterdir():  # the checkpoint's files newer than the results, its bytes the same
        os.utime(f, (base + 100, base + 100))
    assert again() == []
    # recorded before fingerprints: the file times decide, once
    (where / "study_eval.json").write_text(json.dumps({"cpu_s": 1.0, "wall_s": 1.0}))
    os.utime(where / "results.json", (base + 200, base + 200))
    assert again() == [] and record() == {"cpu_s": 1.0, "wall_s": 1.0, "checkpoint_sha256": fingerprint}
    (where / "study_eval.json").write_text(json.dumps({"cpu_s": 1.0, "wall_s": 1.0}))
    os.utime(where / "results.json", (base, base))
    assert again() == [job.name] and record()["checkpoint_sha256"] == fingerprint
    # other weights (a run trained on, or retrained differently): redone, and the new fingerprint recorded
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(ckpt / "model.safetensors"))
    changed = checkpoint_fingerprint(ckpt)
    assert changed != fingerprint
    assert again() == both and record()["checkpoint_sha256"] == changed
    assert again() == []
    # a config that differs counts as well
    config = json.loads((ckpt / "config.json").read_text())
    config["run"]["log_every"] = config["run"].get("log_every", 1) + 1
    (ckpt / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(ckpt) != changed and again() == both


def test_a_study_directory_without_its_checkpoints_keeps_every_result(tmp_path):
    """What a committed study directory holds (OUT/.gitignore leaves out checkpoints and logs): a re-run trains and
    evaluates nothing and reports the same numbers; every run was evaluated when it finished, the lr not chosen too."""
    import fnmatch

    from mnemos.eval.study import STUDY_GITIGNORE, train_jobs

    run_study(TINY, tmp_path, file=io.StringIO())
    report = (tmp_path / "report.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / ".gitignore").read_text() == STUDY_GITIGNORE
    for job in train_jobs(TINY):  # both lrs of every model: evaluated at the end of their training
        if job.group == "mqar":
            assert (tmp_path / "evals" / job.name / "results.json").is_file(), job.name
    patterns = [line for line in STUDY_GITIGNORE.splitlines() if line and not line.startswith("#")]
    removed = 0
    for path in sorted(tmp_path.rglob("*"), reverse=True):
        rel = path.relative_to(tmp_path).as_posix()
        if any(fnmatch.fnmatch(rel, pat.rstrip("/")) or fnmatch.fnmatch(rel, pat + "*") for pat in patterns):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            removed += 1
    assert removed and not list(tmp_path.rglob("trainer.pt")) and not list(tmp_path.rglob("*.safetensors"))
    again = run_study(TINY, tmp_path, file=io.StringIO())
    assert again["trained"] == [] and again["evaluated"] == [] and not again["failed"]
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == results["cells"]
    strip = lambda text: [line for line in text.splitlines() if "CPU" not in line]  # noqa: E731
    assert strip((tmp_path / "report.md").read_text()) == strip(report)
    assert "lost with their checkpoints" not in report
    # a run's lost tries (started over without a checkpoint) are stated apart from the runs' own time
    from mnemos.eval.study import write_study_report

    record_path = tmp_path / "runs" / train_jobs(TINY)[0].name / RECORD
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "cpu_s_lost": 5400.0}))
    write_study_report(TINY, tmp_path)
    assert "Besides that, 1h30m of trainings lost with their checkpoints" in (tmp_path / "report.md").read_text()


def test_report_only_trains_nothing_and_a_study_of_another_size_is_refused(tmp_path, capsys):
    assert main(["study", "recall", "--tiny", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "holds no study (no study_settings.json)" in capsys.readouterr().err
    assert main(["study", "recall", "--tiny", "--report-only", "--only", "x", "--out", str(tmp_path)]) == 2
    assert "--report-only trains nothing: it takes none of --only, --jobs, --retrain-stale" in capsys.readouterr().err
    job = next(t for t in plan(TINY)[0] if t.group == "mqar")
    run_study(TINY, tmp_path, only=job.name, file=io.StringIO())
    (tmp_path / "report.md").unlink()
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert main(["study", "recall", "--tiny", "--report-only", "--out", str(tmp_path)]) == 0
    assert f"1/{len(plan(TINY)[0])} runs finished" in capsys.readouterr().out and (tmp_path / "report.md").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before  # nothing trained
    for argv in (["--quick"], [], ["--quick", "--report-only"]):
        assert main(["study", "recall", *argv, "--out", str(tmp_path)]) == 2
        assert "holds a 'tiny' study; this is the" in capsys.readouterr().err


def test_a_run_trained_under_other_settings_is_refused_not_resumed(tmp_path, capsys):
    """A grid point's schedule (or a default its models read) changed between sittings: its runs' saved configs no
    longer match, so the study names them and trains nothing rather than resume a run under the old cosine schedule
    (or report it as new)."""
    import dataclasses

    from mnemos.eval.study import GridPoint, stale_runs

    job = next(t for t in plan(TINY)[0] if t.group == "mqar")
    run_study(TINY, tmp_path, only=job.name, file=io.StringIO())
    assert stale_runs(TINY, tmp_path) == {}
    p = TINY.grid[0]
    longer = dataclasses.replace(TINY, grid=(GridPoint(p.seq_len, p.num_kv_pairs, p.vocab_size, p.steps + 2,
                                                       p.batch_size, p.seeds, p.lrs),))
    assert stale_runs(longer, tmp_path) == {job.name: [f"run.steps: {p.steps + 2} != {p.steps}"]}
    mtime = (tmp_path / "runs" / job.name / "checkpoint" / "trainer.pt").stat().st_mtime_ns
    with pytest.raises(ValueError, match=f"(?s)1 run.*{job.name}: run.steps.*remove those run directories"):
        run_study(longer, tmp_path, file=io.StringIO())
    assert (tmp_path / "runs" / job.name / "checkpoint" / "trainer.pt").stat().st_mtime_ns == mtime
    # logging cadence is not a setting of what a run learns
    assert stale_runs(dataclasses.replace(TINY, log_every=TINY.log_every + 1), tmp_path) == {}
    # a default of the models changed since the run was trained: its saved (resolved) config keeps the old value;
    # it counts where the run's variant reads the field
    lmm = next(t for t in plan(TINY)[0] if t.group == "mqar" and t.label == "lmm-d2")
    run_study(TINY, tmp_path, only=lmm.name, file=io.StringIO())
    for name in (job.name, lmm.name):
        saved = json.loads((tmp_path / "runs" / name / "config.json").read_text())
        saved["model"]["memory"]["max_lr"] /= 2
        saved["model"]["window"] += 1  # read by neither
        (tmp_path / "runs" / name / "config.json").write_text(json.dumps(saved))
    lr = saved["model"]["memory"]["max_lr"]
    assert job.config["model"]["variant"] == "gated_deltanet"
    assert stale_runs(TINY, tmp_path) == {lmm.name: [f"model.memory.max_lr: {lr * 2!r} != {lr!r}"]}
    # a config saved before a key existed reads it as the model it saved (value_norm came later, off before)
    saved["model"]["memory"]["max_lr"] *= 2
    del saved["model"]["memory"]["value_norm"]
    (tmp_path / "runs" / lmm.name / "config.json").write_text(json.dumps(saved))
    assert stale_runs(TINY, tmp_path) == {lmm.name: ["model.memory.value_norm: True != False"]}
    path = tmp_path / "runs" / job.name / "config.json"
    path.write_text("{not json")
    assert "config.json unreadable: JSONDecodeError" in stale_runs(TINY, tmp_path)[job.name][0]
    # --retrain-stale removes both (and their evals) and trains them again under the study's settings
    assert (tmp_path / "evals" / lmm.name / "results.json").is_file()
    assert main(["study", "recall", "--tiny", "--retrain-stale", "--only", "mqar-L32-K2-*-lr0.001-s0",
                 "--out", str(tmp_path)]) == 0
    assert stale_runs(TINY, tmp_path) == {}
    assert json.loads((tmp_path / "runs" / lmm.name / "config.json").read_text())["model"]["memory"]["max_lr"] == lr * 2
    assert (tmp_path / "evals" / lmm.name / "results.json").stat().st_mtime_ns > mtime


def test_retraining_a_stale_run_removes_the_stages_fine_tuned_from_it(tmp_path):
    """A passkey run's carried-state stage starts from its weights: when the run is stale and removed, the stage
    (and both runs' evals) go with it, though the stage's own config is unchanged."""
    from mnemos.eval.study import remove_stale_runs, stale_runs

    run_study(TINY, tmp_path, only="passkey-*", file=io.StringIO())
    base, stage = "passkey-gated_deltanet", "passkey-gated_deltanet-carry2"
    assert (tmp_path / "runs" / stage / "checkpoint").is_dir() and (tmp_path / "evals" / stage).is_dir()
    assert remove_stale_runs(TINY, tmp_path) == []
    path = tmp_path / "runs" / base / "config.json"
    saved = json.loads(path.read_text())
    saved["optim"]["lr"] *= 2
    path.write_text(json.dumps(saved))
    assert list(stale_runs(TINY, tmp_path)) == [base]
    assert remove_stale_runs(TINY, tmp_path) == [base, stage]
    left = {p.name for p in (tmp_path / "runs").iterdir()} | {p.name for p in (tmp_path / "evals").iterdir()}
    assert not left & {base, stage, "capacity-gated_deltanet", "capacity-gated_deltanet-carry2"}, left


def _cell(task, model, params, correct, n, state=100, **metrics):
    from mnemos.eval.results import Cell

    return Cell(task=task, model={"name": model}, seed=0, task_config={}, params=params,
                metrics={"correct": correct, "n": n, "accuracy": correct / n, "state_bytes": state, **metrics})


def test_targets_are_judged_from_constructed_results():
    """Each verdict of the report's targets table on results built by hand: met, not met, not run yet."""
    import dataclasses

    from mnemos.eval.results import EvalResults
    from mnemos.eval.study import GridPoint, targets_section

    s = dataclasses.replace(study_settings("full"), grid=(GridPoint(64, 8, 128, 10, 32), GridPoint(64, 4, 128, 10, 32)),
                            passkey_lengths=(16384, 1048576), main_models=())
    at = {"seq_len": 64, "num_kv_pairs": 8, "vocab_size": 128}
    split = dict(near_correct=5, n_near=10, far_correct=1, n_far=90, chance=1 / 64)
    main = EvalResults([
        _cell("mqar", "transformer", at, 995, 1000), _cell("mqar", "transformer", at, 985, 1000),  # two seeds: .990
        _cell("mqar", "gated_deltanet", at, 96, 100, state=12800),
        _cell("mqar", "lmm-d1-eta0", at, 97, 100, state=12800),  # equal state, better: met
        _cell("mqar", "lmm-d2", at, 99, 100, state=135680),
        _cell("mqar", "swa", at, 6, 100, **split),  # far .011 <= chance + .05
        *[_cell("niah", "lmm-x4", {"kind": "passkey", "length": n, "depth": d}, c, 1)
          for n, d, c in ((16384, .1, 0), (16384, .9, 1), (1048576, .1, 1), (1048576, .9, 0))],
        # its fine-tuning stage on longer prompts (state carried): judged in a row of its own
        *[_cell("niah", "lmm-x4-carry32", {"kind": "passkey", "length": n, "depth": d}, c, 1)
          for n, d, c in ((16384, .1, 1), (16384, .9, 1), (1048576, .1, 0), (1048576, .9, 0))],
        _cell("niah", "swa", {"kind": "passkey", "length": 16384, "depth": .5}, 0, 1),
    ])
    extrap = EvalResults([_cell("mqar", "lmm-d2", {**at, "seq_len": 1024}, 96, 100),
                          _cell("mqar", "transformer", {**at, "seq_len": 1024}, 70, 100)])
    records = {"a": {"status": "done", "skipped_steps": 0}, "b": {"status": "done", "skipped_steps": 0}, "c": None}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in targets_section(s, main, extrap, records)
            if line.startswith("| ") and not line.startswith("| target")}
    verdict = {k: v.rstrip(" |").rsplit(" | ", 1)[1] for k, v in rows.items()}
    assert verdict["MQAR (64, 8): transformer ≥ 0.99"] == "met"
    assert "transformer 0.990 (2 seeds" in rows["MQAR (64, 8): transformer ≥ 0.99"]
    assert verdict["MQAR (64, 8): gated_deltanet ≥ 0.95"] == "met"
    assert verdict["MQAR (64, 8): a Titans model ≥ gated_deltanet at ≤ its state"] == "met"
    equal_state = rows["MQAR (64, 8): a Titans model ≥ gated_deltanet at ≤ its state"]
    assert "lmm-d1-eta0 0.970" in equal_state and "(2 of the 6 Titans models evaluated so far)" in equal_state
    # the difference beside its binomial standard error: sqrt(.97 * .03 / 100 + .96 * .04 / 100) = .0260
    assert "difference +0.0100 ± 0.0260 (1 SE over 100 and 100 queries)" in equal_state
    assert verdict["MQAR (64, 8): swa at its window's reach (far ≤ chance + 0.05)"] == "met"
    assert verdict["MQAR (64, 4): transformer ≥ 0.99"] == "not run yet"
    assert verdict["extrapolation: a Titans model trained at L 64 ≥ 0.95 at L 1024, above the transformer"] == "met"
    only, carried = " (prompts of 512 tokens only)", " (windows of 512 tokens, state carried over prompts of up to " \
        "65,536 tokens)"  # the longest stage's (128 windows)
    assert verdict[f"passkey: a Titans model trained at ≤ 512 tokens{only} ≥ 0.95 at 16,384 tokens"] == \
        "**not met**"
    assert rows[f"passkey: a Titans model trained at ≤ 512 tokens{only} ≥ 0.95 at 16,384 tokens"].startswith(
        "| passkey: a Titans model trained at ≤ 512 tokens (prompts of 512 tokens only) ≥ 0.95 at 16,384 tokens | "
        "lmm-x4 0.500 |")  # the stage is not in this row, and lmm-x1 (no cells) is not listed
    assert verdict[f"passkey: a Titans model trained at ≤ 512 tokens{carried} ≥ 0.95 at 16,384 tokens"] == "met"
    assert "lmm-x4-carry32 1.000" in rows[f"passkey: a Titans model trained at ≤ 512 tokens{carried} ≥ 0.95 at " \
                                          "16,384 tokens"]
    for how in (only, carried):
        assert verdict[f"passkey: a Titans model trained at ≤ 512 tokens{how} ≥ 0.9 at 1,048,576 tokens"] == \
            "**not met**"
    assert verdict["passkey: swa ≤ 0.10 beyond its window (64)"] == "met"
    assert verdict["zero skipped steps in every study run"] == "met"

    # a model whose lr choice is not final (another lr's run unfinished): its verdicts are provisional and say why;
    # a met equal-state comparison waits on Gated DeltaNet's lr only (a Titans model's other lr can only help)
    open_rows = {line.split(" | ")[0].lstrip("| "): line
                 for line in targets_section(s, main, extrap, records, {"L64-K8": {"gated_deltanet", "lmm-d1-eta0"}})
                 if line.startswith("| ") and not line.startswith("| target")}
    assert open_rows["MQAR (64, 8): gated_deltanet ≥ 0.95"].endswith(
        "(lr choice not final for gated_deltanet: an lr's run is unfinished) | met (provisional) |")
    assert open_rows["MQAR (64, 8): transformer ≥ 0.99"] == rows["MQAR (64, 8): transformer ≥ 0.99"]
    assert open_rows["MQAR (64, 8): a Titans model ≥ gated_deltanet at ≤ its state"].endswith(
        "(lr choice not final for gated_deltanet: an lr's run is unfinished) | met (provisional) |")
    only_titans = targets_section(s, main, extrap, records, {"L64-K8": {"lmm-d1-eta0"}})
    assert any(r.startswith("| MQAR (64, 8): a Titans model ≥ gated_deltanet") and r.endswith("| met |")
               for r in only_titans)
    assert targets_section(s, main, extrap, records, {"L64-K4": {"gated_deltanet"}}) == \
        targets_section(s, main, extrap, records)  # nothing judged at that point yet: nothing provisional

    # the Titans model below gated_deltanet, then the only Titans model larger than it: not judged while other
    # Titans models are still to be evaluated, not met once every one is
    main.cells[3].metrics.update(correct=90, accuracy=0.9)
    rows = targets_section(s, main, extrap, records)
    assert any("at ≤ its state | lmm-d1-eta0 0.900" in r and r.endswith("not run yet |") for r in rows)
    every = dataclasses.replace(s, models=("transformer", "gated_deltanet", "lmm-d1-eta0", "lmm-d2", "swa"))
    rows = targets_section(every, main, extrap, records)
    assert any("at ≤ its state | lmm-d1-eta0 0.900" in r and r.endswith("**not met** |") for r in rows)
    del main.cells[3]
    rows = targets_section(s, main, extrap, {"a": {"status": "done", "skipped_steps": 3}})
    assert any("no Titans model at ≤ 12,800 B (best at any size: lmm-d2 0.990" in r and r.endswith("not run yet |")
               for r in rows)
    judged = targets_section(dataclasses.replace(every, models=("transformer", "gated_deltanet", "lmm-d2", "swa")),
                             main, extrap, {})
    assert any("no Titans model at ≤ 12,800 B (best at any size: lmm-d2 0.990" in r and r.endswith("**not met** |")
               for r in judged)
    assert any(r.startswith("| zero skipped steps") and "3 in 1 finished runs" in r and r.endswith("**not met** |")
               for r in rows)


def test_main_models_train_at_the_main_point_only_and_are_judged_with_the_others():
    """``main_models`` (the one-head ablation): trained at the main point only, with its seeds and lrs; a Gated
    DeltaNet among them gets its own equal-state row, and the extrapolation target is judged against the best
    transformer measured, whichever head count."""
    import dataclasses

    from mnemos.eval.results import EvalResults
    from mnemos.eval.study import GridPoint, planned, targets_section, train_jobs

    s = dataclasses.replace(study_settings("full"), grid=(GridPoint(64, 8, 128, 10, 32, (0, 1)),
                                                          GridPoint(64, 4, 128, 10, 32)),
                            passkey_models=(), capacity_models=(), passkey_carry_models=())
    assert s.point_models("L64-K8") == s.models + s.main_models and s.point_models("L64-K4") == s.models
    jobs = planned(s, train_jobs(s), {})
    one_head = [t for t in jobs if t.label in s.main_models]
    assert one_head and {t.point for t in one_head} == {"L64-K8"}
    assert len(one_head) == len(s.main_models) * 3  # 2 lrs at seed 0, the chosen one at seed 1
    for t in one_head:
        assert t.config["model"]["n_heads"] == 1 and t.config["model"]["d_model"] == s.d_model
        # the whole schedule of main_models_steps, no stop at 0.99 (the grid's runs keep theirs)
        assert t.config["run"]["steps"] == s.main_models_steps == 6000 and t.config["run"]["stop_at_accuracy"] == 0
    assert all(t.config["run"]["steps"] == 10 and t.config["run"]["stop_at_accuracy"] == 0.99
               for t in jobs if t.label not in s.main_models)
    assert {t.config["run"]["steps"] for t in planned(dataclasses.replace(s, main_models_steps=0), train_jobs(
        dataclasses.replace(s, main_models_steps=0)), {}) if t.label in s.main_models} == {10}
    with pytest.raises(ValueError, match="main_models_steps must be an int >= 0"):
        dataclasses.replace(s, main_models_steps=-1)
    lmm = next(t for t in one_head if t.label == "lmm-d1-eta0-c1-h1")
    assert lmm.config["model"]["memory"] == {**STUDY_MEMORY, "depth": 1, "momentum": False, "chunk_size": 1}
    assert all(t.config["model"]["n_heads"] == s.n_heads for t in jobs if t.label in s.models)
    with pytest.raises(ValueError, match="not in models"):
        dataclasses.replace(s, main_models=("lmm-d2",))
    with pytest.raises(ValueError, match="distinct"):
        dataclasses.replace(s, main_models=("gated_deltanet-h1", "gated_deltanet-h1"))
    with pytest.raises(ValueError, match="unknown study models"):
        dataclasses.replace(s, main_models=("lmm-h3",))

    at = {"seq_len": 64, "num_kv_pairs": 8, "vocab_size": 128}
    long = {**at, "seq_len": 1024}
    main = EvalResults([_cell("mqar", "gated_deltanet", at, 96, 100, state=12800),
                        _cell("mqar", "gated_deltanet-h1", at, 99, 100, state=37376),
                        _cell("mqar", "lmm-d1-eta0-c1", at, 97, 100, state=12800),
                        _cell("mqar", "lmm-d1-eta0-c1-h1", at, 98, 100, state=37376)])
    extrap = EvalResults([_cell("mqar", "lmm-d1-h1", long, 96, 100), _cell("mqar", "transformer", long, 70, 100),
                          _cell("mqar", "transformer-h1", long, 97, 100)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in targets_section(s, main, extrap, {})
            if line.startswith("| ") and not line.startswith("| target")}
    verdict = {k: v.rstrip(" |").rsplit(" | ", 1)[1] for k, v in rows.items()}
    every = len([m for m in s.point_models("L64-K8") if m.startswith(("lmm", "mac", "mag", "mal"))])
    assert "lmm-d1-eta0-c1 0.970" in rows["MQAR (64, 8): a Titans model ≥ gated_deltanet at ≤ its state"]
    one = rows["MQAR (64, 8): a Titans model ≥ gated_deltanet-h1 at ≤ its state"]
    assert "lmm-d1-eta0-c1-h1 0.980" in one and f"(2 of the {every} Titans models" in one
    assert verdict["MQAR (64, 8): a Titans model ≥ gated_deltanet-h1 at ≤ its state"] == "not run yet"
    assert "MQAR (64, 4): a Titans model ≥ gated_deltanet-h1 at ≤ its state" not in rows
    ext = "extrapolation: a Titans model trained at L 64 ≥ 0.95 at L 1024, above the transformer"
    # below the one-head transformer, and Titans models still to come: not judged yet
    assert rows[ext].startswith(f"| {ext} | lmm-d1-h1 0.960, transformer-h1 0.970 (") and verdict[ext] == "not run yet"
    every = [_cell("mqar", m, long, 90, 100) for m in s.point_models("L64-K8")
             if m.startswith(("lmm", "mac", "mag", "mal")) and m != "lmm-d1-h1"]
    rows = [r for r in targets_section(s, main, EvalResults(extrap.cells + every), {}) if r.startswith(f"| {ext}")]
    assert rows == [f"| {ext} | lmm-d1-h1 0.960, transformer-h1 0.970 | **not met** |"]
    extrap.cells.pop()  # without the one-head transformer: above the four-head one, but it may still beat it
    rows = [r for r in targets_section(s, main, extrap, {}) if r.startswith(f"| {ext}")]
    assert rows == [f"| {ext} | lmm-d1-h1 0.960, transformer 0.700 (transformer-h1 not evaluated yet) | not run yet |"]
    s = dataclasses.replace(s, main_models=tuple(m for m in s.main_models if m != "transformer-h1"))
    rows = [r for r in targets_section(s, main, extrap, {}) if r.startswith(f"| {ext}")]
    assert rows == [f"| {ext} | lmm-d1-h1 0.960, transformer 0.700 | met |"]


def test_leaving_the_plateau_table_reads_each_seed_at_the_early_steps(tmp_path):
    """The report's "Leaving the plateau" rows, from run directories built by hand: the eval at each step, a run
    that stopped at the threshold holding its last value, "—" where a finished run logged no eval at the step, and
    runs not finished left out."""
    import dataclasses

    from mnemos.eval.study import GridPoint, _early_section, accuracy_at, planned, select_lrs, train_jobs

    rows = [{"step": 500, "val_accuracy": 0.2}, {"step": 1000, "val_accuracy": 0.8},
            {"step": 1250, "val_accuracy": 0.99}]
    assert [accuracy_at(rows, k) for k in (500, 1000, 1500)] == [0.2, 0.8, 0.99]
    assert accuracy_at(rows, 750) is None and accuracy_at([], 500) is None
    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 2000, 4, (0, 1, 2)),),
                            main=(32, 2), lrs=(1e-3,), passkey_models=(), capacity_models=(), passkey_carry_models=())
    runs = {0: ({"status": "done", "steps": 1250, "stopped_at_accuracy": True}, rows),
            1: ({"status": "done", "steps": 2000}, [{"step": k, "val_accuracy": a}
                                                    for k, a in ((500, .1), (1000, .3), (2000, .5))]),
            2: ({"status": "stopped", "steps": 500}, [{"step": 500, "val_accuracy": .7}])}  # not finished
    for seed, (record, vals) in runs.items():
        run_dir = tmp_path / "runs" / f"mqar-L32-K2-gated_deltanet-lr0.001-s{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / RECORD).write_text(json.dumps(record))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"split": "val", **v}) + "\n" for v in vals))
    candidates = train_jobs(s)
    chosen = select_lrs(s, candidates, tmp_path)
    lines = _early_section(s, planned(s, candidates, {k: v["lr"] for k, v in chosen.items()}), chosen, tmp_path)
    assert lines[0] == "## Leaving the plateau at L=32 K=2"
    assert "| gated_deltanet | 0.001 | 0.200 / 0.100 | 0.800 / 0.300 | 0.990 / — | 0.990 / 0.500 | 0, 1 |" in lines


def test_a_run_whose_lr_can_no_longer_be_chosen_stops_where_the_choice_was_made(tmp_path):
    """The lr is chosen by who reaches the stopping accuracy first: once the earlier lr's run reached it at step r,
    the later lr's run is cut after its eval at step r (``decided_at``), counts as finished, and the choice and its
    column stand as they would have; a run already past r is marked so without training."""
    import dataclasses

    from mnemos.eval.study import GridPoint, _earlier_lr_twin, decided_step, finished_step, run_is_done, select_lrs, \
        train_jobs, train_one, val_rows

    s = dataclasses.replace(TINY, models=("gated_deltanet",), grid=(GridPoint(32, 2, 64, 12, 4, (0, 1)),),
                            eval_every=2, passkey_models=(), capacity_models=(), passkey_carry_models=())
    jobs = [j for j in train_jobs(s) if j.group == "mqar"]
    first, second = sorted((j for j in jobs if j.seed == 0), key=lambda j: j.lr)
    other_seed = next(j for j in jobs if j.seed == 1 and j.lr == first.lr)
    assert first.config["run"]["stop_at_accuracy"] > 0
    assert _earlier_lr_twin(s, first, second) and not _earlier_lr_twin(s, second, first)
    assert not _earlier_lr_twin(s, first, other_seed)
    assert decided_step(s, second, tmp_path) is None  # nothing finished yet

    # the first lr's run finished having reached the stopping accuracy at step 4 (its record and log by hand)
    won = tmp_path / "runs" / first.name
    won.mkdir(parents=True)
    (won / RECORD).write_text(json.dumps({"status": "done", "steps": 4, "stopped_at_accuracy": True}))
    (won / "metrics.jsonl").write_text("\n".join(json.dumps({"step": step, "split": "val", "val_accuracy": acc})
                                                 for step, acc in ((2, 0.5), (4, 0.995))) + "\n")
    assert decided_step(s, second, tmp_path) == (4, first.name)
    assert decided_step(s, first, tmp_path) is None and decided_step(s, other_seed, tmp_path) is None

    run_dir = tmp_path / "runs" / second.name
    record = train_one(second, run_dir, decided=(4, first.name))
    assert record["status"] == "done" and not record["stopped_at_accuracy"]
    assert (record["steps"], record["decided_at"], record["decided_by"]) == (4, 4, first.name)
    assert finished_step(second, run_dir) == 4 and run_is_done(second, run_dir)
    assert [r["step"] for r in val_rows(run_dir)] == [2, 4]
    entry = select_lrs(s, jobs, tmp_path)[(second.point, second.label)]
    assert entry["chosen"] and entry["lr"] == first.lr and [r["step"] for r in entry["by_lr"][second.lr]] == [4]

    # a sitting past the decided step (killed after logging an eval its checkpoint does not hold): no training, the
    # run ends at its checkpoint and the later log is left out
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "split": "val", "val_accuracy": 0.7}) + "\n")
    before = (run_dir / "checkpoint" / "trainer.pt").stat().st_mtime_ns
    again = train_one(second, run_dir, decided=(2, first.name))
    assert (again["status"], again["steps"], again["decided_at"]) == ("done", 4, 4)
    assert (run_dir / "checkpoint" / "trainer.pt").stat().st_mtime_ns == before
    assert [r["step"] for r in val_rows(run_dir)] == [2, 4]


def test_a_model_entry_may_set_its_training_and_the_others_keep_their_configs():
    """``MODELS[label]["optim"]`` (the floored passkey LMM's write penalty) goes into that model's runs only, and
    builds a valid config; every other run's optim section is the lr and warmup alone, as before the key existed."""
    from mnemos.eval.study import MODELS
    from mnemos.train.config import TrainConfig

    trains, _ = plan(study_settings("full"))
    by_name = {t.name: t for t in trains}
    floors = by_name["passkey-lmm-x4-floors"].config
    assert floors["optim"] == {"lr": 3e-3, "warmup_steps": 100, "write_penalty": 0.3}
    assert floors["model"]["memory"] == {**STUDY_MEMORY, **MODELS["lmm-x4-floors"]["memory"]}
    assert "optim" not in floors["model"]
    cfg = TrainConfig.from_dict(json.loads(json.dumps(floors)))
    assert cfg.optim.write_penalty == 0.3 and cfg.model.memory.write_floor == 0.05
    assert by_name["passkey-lmm-x4"].config["optim"] == {"lr": 3e-3, "warmup_steps": 100}
    p1 = by_name["passkey-lmm-x4-floors-p1"].config
    assert p1["optim"]["write_penalty"] == 1.0 and p1["model"] == floors["model"]  # the penalty is all that differs
    assert all(set(t.config["optim"]) <= {"lr", "warmup_steps"} for t in trains
               if t.label not in ("lmm-x4-floors", "lmm-x4-floors-p1"))


def test_the_committed_study_directory_matches_the_study_it_was_run_as():
    """``results/study-recall`` holds the full study's 139 runs: a default changed since (a new memory setting, a
    model's field) must leave them reproducible as run (``study.STUDY_MEMORY``), or `mnemos study recall` would
    refuse the directory as stale."""
    from pathlib import Path

    from mnemos.eval.study import stale_runs

    out = Path(__file__).resolve().parents[2] / "results" / "study-recall"
    if not (out / "study.json").is_file():
        pytest.skip("no committed study directory in this checkout")
    assert stale_runs(study_settings("full"), out) == {}
