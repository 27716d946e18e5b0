"""The memory's stability grid (issue 12, item 1): short `mnemos train` runs of every Titans variant over memory
depths, chunk sizes, outer learning rates, presets and seeds, each checked for the two ways a test-time memory fails:

- **skipped steps**: a non-finite loss or gradient (the trainer skips the update);
- **inner divergence**: the memory's associative loss *rising* over a sequence (``mem.{i}.inner_loss`` above
  ``mem.{i}.inner_loss_start`` by more than 0.01, ``mnemos.train.loop.inner_loss_rose``, on a logged step). The layer's output is RMS-normalised, so a memory that diverges
  inside the forward leaves the outer loss finite and skips nothing: the model just never learns.

A run passes when it has neither and reaches its last step. One whose process ends with an error before that (the
trainer stops a run after 10 skipped steps in a row: a diverging memory) is a failure too, reported with the step it
ended at and not run again (delete its directory to retry); one stopped by a signal is unfinished.

Every run is ``mnemos train --preset P --threads 1`` with overrides, in its own directory under ``--out``; a run whose
``metrics.jsonl`` reached its last step is not run again (resumable), so a killed grid continues where it stopped. Each run's CPU time (its process's, from the OS) goes to
``OUT/NAME/grid_run.json``. Prints a table and writes ``OUT/grid.json`` and ``OUT/grid.md``, and ``OUT/.gitignore``
(the checkpoints, logs and plots), so that the directory can be committed and the grid grow sitting by sitting.

    PYTHONPATH=src python benchmarks/stability_grid.py --out /tmp/grid --quick --jobs 2   # ~1 CPU-hour
    PYTHONPATH=src python benchmarks/stability_grid.py --out /tmp/grid --jobs 2           # the full grid, ~5 CPU-h per lr and seed

``--sample N`` runs N configurations drawn uniformly from the grid the other options define (breadth at a fraction of
the cost: if all N pass, a failure rate above 3/N is unlikely); ``--deadline`` / ``--max-crashes`` / ``--jobs`` size
a grid to a fixed budget such as a GPU lease (``benchmarks/gpu_session.sh``, the grid part). The table covers every
run in ``--out``, those of earlier invocations with other options included.

``--quick``: the corners where the memory is most at risk (depth 3: the largest curvature; chunk 64: the largest
summed step at one anchor) for the four variants on the MQAR preset, and the default memory on the LM preset, at
outer lr 1e-2 (the top of the issue's range), seed 0. The full grid: depth 1, 2, 3 at chunk 4 and chunk 1, 16, 64
at depth 2, on both presets; ``--lrs`` and ``--seeds`` widen it to the issue's lr 1e-3 ... 1e-2 and seeds 0-4.
``--memories 2:1`` keeps only the listed (depth, chunk) points of it (e.g. the token-by-token writes, chunk 1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mnemos.train.loop import inner_loss_rose

VARIANTS = ("lmm", "mac", "mag", "mal")
GRID_GITIGNORE = """# written by benchmarks/stability_grid.py: the directory without these keeps every result and resumes
*/checkpoint/
*/metrics.csv
*/train.log
*/*.png
"""
RECORD = "grid_run.json"
MEMORIES = ((1, 4), (2, 4), (3, 4), (2, 1), (2, 16), (2, 64))  # (depth, chunk)
STEPS = {"mqar": 300, "lm": 150}


def grid(quick: bool, lrs: list[float], seeds: list[int], presets: list[str],
         only: list[tuple[int, int]] | None = None) -> list[dict]:
    """The runs in the order they are started: lr by lr in the order given, seed by seed within it, so a grid cut
    short (``--deadline``) has covered whole (lr, seed) slices of every variant, memory and preset. ``only``: the
    (depth, chunk) points to keep (``--memories``), on every preset."""
    runs = []
    for lr in lrs:
        for seed in seeds:
            for preset in presets:
                if only is not None:
                    memories = tuple(only)
                elif quick:
                    memories = ((3, 4), (2, 64)) if preset == "mqar" else ((2, 4),)
                else:
                    memories = MEMORIES
                for variant in VARIANTS:
                    for depth, chunk in memories:
                        name = f"{preset}-{variant}-d{depth}-c{chunk}-lr{lr:g}-s{seed}"
                        runs.append(dict(name=name, preset=preset, variant=variant, depth=depth, chunk=chunk, lr=lr,
                                         seed=seed, steps=STEPS[preset]))
    return runs


def command(run: dict, out: Path, device: str = "auto") -> list[str]:
    return [sys.executable, "-m", "mnemos.cli", "train", "--preset", run["preset"], "--threads", "1",
            f"model.variant={run['variant']}", f"model.memory.depth={run['depth']}",
            f"model.memory.chunk_size={run['chunk']}", f"optim.lr={run['lr']}", f"run.seed={run['seed']}",
            f"run.steps={run['steps']}", f"run.eval_every={run['steps']}", "run.save_every=0",
            f"run.device={device}", f"run.out_dir={out / run['name']}"]


def run_device(out: Path, name: str) -> str | None:
    """Where the run trained, from the trainer's first line ("... 1 process(es) on cuda:0, ..."), or None."""
    try:
        head = (out / name / "train.log").read_text(errors="replace")[:2000]
    except OSError:
        return None
    for line in head.splitlines():
        if " process(es) on " in line:
            return line.split(" process(es) on ", 1)[1].split(",", 1)[0].strip()
    return None


def error_exit(run: dict, out: Path) -> int | None:
    """The exit code of a run whose process ended with an error (a positive code: the trainer stops a diverging run
    with FloatingPointError after ``MAX_SKIPPED_IN_A_ROW`` skipped steps in a row, or the run crashed), else None: no
    record yet, a clean exit, or a stop by a signal (a negative code: ``--deadline``'s kill, a pkill at a sitting's
    end), which leaves the run to the next invocation."""
    try:
        code = json.loads((out / run["name"] / RECORD).read_text()).get("returncode")
    except (OSError, json.JSONDecodeError):
        return None
    return code if isinstance(code, int) and code > 0 else None


def summarise(run: dict, out: Path) -> dict | None:
    """The run's outcome from its metrics.jsonl, or None while it is still to run (not recorded, or stopped by a
    signal before its last step). A run whose process ended with an error before its last step is an outcome too, a
    failure (``ended_early``: the last logged step and the exit code), not an unfinished run: a diverging memory stops
    the trainer, and the grid must count that, not run it again. Delete its directory to retry it."""
    path = out / run["name"] / "metrics.jsonl"
    rows = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    train = [r for r in rows if r.get("split") == "train"]
    ended_early = None
    if not train or train[-1]["step"] < run["steps"]:
        code = error_exit(run, out)
        if code is None:
            return None
        ended_early = {"step": train[-1]["step"] if train else 0, "exit_code": code}
    val = [r for r in rows if r.get("split") == "val"]
    worst_ratio, worst_curv = 0.0, 0.0
    rose = []
    for r in train:
        for k, v in r.items():
            if k.endswith(".inner_loss") and k + "_start" in r:
                ratio = v / r[k + "_start"] if r[k + "_start"] > 0 else math.inf
                worst_ratio = max(worst_ratio, ratio if ratio == ratio else math.inf)  # NaN counts as infinite
                if inner_loss_rose(r[k + "_start"], v):
                    rose.append(r["step"])
            if k.endswith(".curvature_max"):
                worst_curv = max(worst_curv, v)
    skipped = int(train[-1].get("skipped_steps", 0)) if train else 0
    try:
        record = json.loads((out / run["name"] / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    device = record.get("device") or run_device(out, run["name"])  # the record's (train.log is not committed)
    last_val = val[-1] if val else {}
    return {**run, "device": device, "cpu_s": record.get("cpu_s"), "skipped_steps": skipped, "inner_rose_at": sorted(set(rose)), "worst_inner_ratio": worst_ratio,
            "max_curvature": worst_curv, "final_val_accuracy": last_val.get("val_accuracy"),
            "val_chance": last_val.get("val_chance"), "val_any_value_level": last_val.get("val_any_value_level"),
            "ended_early": ended_early, "passed": ended_early is None and skipped == 0 and not rose}


def earlier_runs(out: Path, runs: list[dict]) -> list[dict]:
    """The runs in ``out`` that an earlier invocation made with other options (their record names them), so that the
    directory's table covers every run in it, not only this invocation's."""
    names = {r["name"] for r in runs}
    found = []
    for record in sorted(out.glob(f"*/{RECORD}")):
        try:
            run = json.loads(record.read_text()).get("run")
        except (OSError, json.JSONDecodeError):
            continue
        if run is None:
            run = parse_name(record.parent.name)  # a record from before runs were written into it
        if isinstance(run, dict) and run.get("name") == record.parent.name and run["name"] not in names:
            found.append(run)
    return found


def parse_name(name: str) -> dict | None:
    """The run a grid directory's name describes (``{preset}-{variant}-d{depth}-c{chunk}-lr{lr}-s{seed}[-stepsN]``),
    or None."""
    m = re.fullmatch(r"(mqar|lm)-(\w+)-d(\d+)-c(\d+)-lr([0-9.e+-]+?)-s(\d+)(?:-steps(\d+))?", name)
    if m is None or m.group(2) not in VARIANTS:
        return None
    preset = m.group(1)
    return dict(name=name, preset=preset, variant=m.group(2), depth=int(m.group(3)), chunk=int(m.group(4)),
                lr=float(m.group(5)), seed=int(m.group(6)),
                steps=int(m.group(7)) if m.group(7) else STEPS[preset])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1); each is one process, one thread")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="the trainer's run.device (default auto: CUDA when there is one, in bfloat16 autocast)")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help="start no run after S seconds and stop the ones still running at S + --grace (they stay "
                        "unfinished and run again next time): a grid sized to a fixed budget, e.g. a GPU lease")
    p.add_argument("--grace", type=float, default=60.0, metavar="S", help="see --deadline (default 60)")
    p.add_argument("--max-crashes", type=int, default=None, metavar="N",
                   help="start no run after N runs exited with an error (a broken install or device fails every run "
                        "in seconds; on a leased machine that would spend the lease on tracebacks)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--presets", nargs="+", default=["mqar", "lm"], choices=("mqar", "lm"))
    p.add_argument("--memories", nargs="+", default=None, metavar="D:C",
                   help="only these (depth, chunk) memories, e.g. 2:1 (default: the full grid's "
                        + ", ".join(f"{d}:{c}" for d, c in MEMORIES) + "; --quick's corners with --quick)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="run N configurations drawn uniformly (without replacement) from the grid the other options "
                        "define, instead of all of it: breadth over variants, memories, presets, lrs and seeds at a "
                        "fraction of the cost (if all N pass, a failure rate above 3/N is unlikely, p < 0.05)")
    p.add_argument("--sample-seed", type=int, default=0, metavar="S", help="the draw's seed (default 0)")
    p.add_argument("--report-only", action="store_true",
                   help="write grid.json / grid.md from the runs finished so far and train nothing (safe beside a grid "
                        "that is running)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"train every run N steps instead of the grid's {STEPS} (a check of the pipeline, not of "
                        "stability; such runs are named ...-stepsN, apart from the grid's)")
    a = p.parse_args()
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    only = None
    if a.memories is not None:
        only = []
        for m in a.memories:
            match = re.fullmatch(r"(\d+):(\d+)", m)
            if match is None or not 1 <= int(match[1]) <= 3 or not 1 <= int(match[2]) <= 64:
                p.error(f"--memories takes DEPTH:CHUNK with depth 1..3 and chunk 1..64 (e.g. 2:1), got {m!r}")
            only.append((int(match[1]), int(match[2])))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        (out / ".gitignore").write_text(GRID_GITIGNORE)
    runs = grid(a.quick, a.lrs, a.seeds, a.presets, only)
    if a.sample is not None:
        if not 1 <= a.sample <= len(runs):
            p.error(f"--sample must be in 1..{len(runs)} (the grid's size), got {a.sample}")
        picked = set(random.Random(a.sample_seed).sample(range(len(runs)), a.sample))
        runs = [r for i, r in enumerate(runs) if i in picked]  # in the grid's order
    if a.steps is not None:
        runs = [{**r, "name": f"{r['name']}-steps{a.steps}", "steps": a.steps} for r in runs]
    todo = [] if a.report_only else [r for r in runs if summarise(r, out) is None]
    if not a.report_only:
        print(f"stability grid: {len(runs)} runs, {len(runs) - len(todo)} done before", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[dict, subprocess.Popen, float]] = []
    start = time.perf_counter()
    crashes = 0
    while todo or running:
        if a.max_crashes is not None and crashes >= a.max_crashes and todo:
            print(f"stability grid: {crashes} runs exited with an error (--max-crashes {a.max_crashes}), "
                  f"{len(todo)} runs not started; see their train.log", flush=True)
            todo = []
        elapsed = time.perf_counter() - start
        if a.deadline is not None and elapsed > a.deadline and todo:
            print(f"stability grid: --deadline {a.deadline:g} s reached, {len(todo)} runs not started", flush=True)
            todo = []
        if a.deadline is not None and elapsed > a.deadline + a.grace:
            for _, proc, _ in running:
                proc.kill()  # reaped below: its directory stays unfinished, and the next invocation runs it afresh
        while todo and len(running) < a.jobs:
            r = todo.pop(0)
            shutil.rmtree(out / r["name"], ignore_errors=True)  # what a killed attempt left: start it afresh
            (out / r["name"]).mkdir(parents=True)
            with open(out / r["name"] / "train.log", "w") as log:  # the child holds its own copy of the descriptor
                running.append((r, subprocess.Popen(command(r, out, a.device), stdout=log, stderr=subprocess.STDOUT,
                                                    env=env), time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            r, proc, t0 = item
            # reaped here rather than by proc.poll(), for the child's own CPU time (its rusage)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            running.remove(item)
            killed = a.deadline is not None and time.perf_counter() - start > a.deadline + a.grace
            crashes += proc.returncode != 0 and not killed
            (out / r["name"] / RECORD).write_text(json.dumps({
                "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - t0,
                "returncode": proc.returncode, "device": run_device(out, r["name"]), "run": r}))
            s = summarise(r, out)
            early = s is not None and s["ended_early"]
            print(f"{r['name']}: " + ("did not finish (see train.log)" if s is None else
                  f"{'pass' if s['passed'] else 'FAIL'}: "
                  + (f"ended at step {early['step']} with exit code {early['exit_code']} (see train.log), " if early
                     else "") +
                  f"skipped {s['skipped_steps']}, inner loss rose at "
                  f"{len(s['inner_rose_at'])} logged steps, max curvature {s['max_curvature']:.3g}"), flush=True)
    results = [summarise(r, out) or {**r, "passed": None} for r in runs + earlier_runs(out, runs)]
    (out / "grid.json").write_text(json.dumps(results, indent=1))
    lines = ["| preset | variant | depth | chunk | lr | seed | steps | skipped | inner loss rose (logged steps) | "
             "worst inner end/start | max curvature | final val acc | CPU s | pass |", "|" + "---|" * 14]
    for s in results:
        if s["passed"] is None:
            lines.append(f"| {s['preset']} | {s['variant']} | {s['depth']} | {s['chunk']} | {s['lr']:g} | {s['seed']} "
                         f"| — | not finished | | | | | | |")
            continue
        acc, cpu, early = s["final_val_accuracy"], s.get("cpu_s"), s.get("ended_early")
        skipped = (f"{s['skipped_steps']} (ended at step {early['step']}, exit code {early['exit_code']})" if early
                   else s["skipped_steps"])
        lines.append(f"| {s['preset']} | {s['variant']} | {s['depth']} | {s['chunk']} | {s['lr']:g} | {s['seed']} | "
                     f"{s['steps']} | {skipped} | {len(s['inner_rose_at'])} | {s['worst_inner_ratio']:.2f} | "
                     f"{s['max_curvature']:.3g} | {'—' if acc is None else f'{acc:.3f}'} | "
                     f"{'—' if cpu is None else f'{cpu:.0f}'} | {'yes' if s['passed'] else '**no**'} |")
    done = [s for s in results if s["passed"] is not None]
    ended = [s for s in done if s.get("ended_early")]
    cpu_total = sum(s.get("cpu_s") or 0.0 for s in done)
    lines += ["", f"{len(done) - len(ended)} of {len(results)} runs finished, {sum(bool(s['passed']) for s in done)} "
              "passed; "
              + (f"{len(ended)} ended early with an error (failures, not run again: delete a run's directory to retry "
                 "it); " if ended else "")
              + f"CPU time {cpu_total / 3600:.2f} h (each run's own process; runs made before it was recorded count "
              "0)."]
    levels = sorted({(s["preset"], s.get("val_chance"), s.get("val_any_value_level")) for s in done
                     if s.get("val_chance") is not None and s.get("val_any_value_level") is not None})
    if levels:  # what a shortcut scores, beside the accuracy column (the trainer's own levels, from metrics.jsonl)
        lines.append("final val acc: validation accuracy at the run's last step; beside it "
                     + "; ".join(f"{p}: chance {c:.3g}, any context value 1/K {k:.3g}" for p, c, k in levels) + ".")
    devices = Counter(s.get("device") or "unrecorded" for s in done)
    if devices:
        cuda = any(d.startswith("cuda") for d in devices)
        lines.append("Trained on: " + ", ".join(f"{d} ({n} runs)" for d, n in sorted(devices.items()))
                     + (" (CUDA runs in the trainer's default bfloat16 autocast)." if cuda else "."))
    (out / "grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if a.report_only or a.deadline is not None:
        # runs left unfinished (not yet run here, or cut by --deadline) are no failure; a crashed run is
        return 0 if crashes == 0 and all(s["passed"] is not False for s in results) else 1
    return 0 if all(s["passed"] for s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
