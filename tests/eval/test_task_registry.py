"""The task registry: a task registered from outside the package (one class, one registration) is evaluated by the
harness, gets its ``mnemos eval`` subcommand and flags, writes its report section and draws its figures; the
built-in tasks are the registered ones, in the report's order."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from mnemos.cli import main
from mnemos.data import LMDataConfig, PasskeyCapacityConfig
from mnemos.eval import EvalOptions, InductionLM, evaluate, write_report
from mnemos.eval.plots import figure, make_figures, save
from mnemos.eval.registry import EvalTask, register_task, task_of
from mnemos.eval.tables import acc, model_names, pool, table
from mnemos.eval.tasks import TASKS


@dataclass(frozen=True)
class CountConfig:
    """A toy task: the model sees ``n`` tokens; its cell records how many it was fed."""

    n: int = 5

    def build(self, seed: int) -> int:
        return self.n


class CountTask(EvalTask):
    name = "count"
    config_type = CountConfig
    help = "a toy task"

    def tokens(self, config, options):
        return config.n

    def evaluate(self, run):
        params = {"n": run.config.n}
        return [run.guarded(params, lambda: run.cell(params, metrics={"accuracy": 1.0, "correct": 1, "n": 1}))]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, default=5)
        parser.add_argument("--threshold", type=float, default=0.95)

    def from_args(self, args):
        return CountConfig(args.n)

    def eval_options(self, args):
        return {"capacity_threshold": args.threshold}

    def section(self, results, notes):
        points = pool(results, self.name)
        rows = [[m, notes.mark(p, acc)] for m, p in zip(model_names(points), points, strict=True)]
        return ["## Count", "", *table(["model", "accuracy"], rows), ""] if points else []

    def figures(self, results, out_dir):
        points = pool(results, self.name)
        if not points:
            return []
        fig = figure(4, 3)
        fig.subplots().bar([p.model for p in points], [p.params["n"] for p in points])
        return [save(fig, out_dir / "count.png")]


@pytest.fixture
def count_task():
    task = register_task(CountTask())  # what a new task's module adds to mnemos/eval/tasks/__init__.py
    yield task
    del TASKS[task.name]


def test_the_built_in_tasks_in_report_order():
    assert list(TASKS) == ["mqar", "niah", "babilong", "capacity", "lm"]
    assert task_of(PasskeyCapacityConfig()).name == "capacity"
    with pytest.raises(TypeError, match="not a task config: CountConfig"):
        task_of(CountConfig())
    with pytest.raises(ValueError, match="already registered"):
        register_task(TASKS["mqar"])


def test_a_registered_task_runs_everywhere(count_task, tmp_path, capsys):
    res = evaluate(InductionLM(vocab_size=64), CountConfig(3), options=EvalOptions(progress=False))
    (cell,) = res.cells
    assert cell.task == "count" and cell.params == {"n": 3} and cell.task_config == {"type": "CountConfig", "n": 3}
    assert "## Count" in res.markdown() and "| induction-8 | 1.00 |" in res.markdown()

    assert main(["eval", "count", "--n", "7", "--threshold", "0.5", "--model", "baseline:random", "--no-progress",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    assert "## Count" in capsys.readouterr().out
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cell["task"] == "count" and cell["params"] == {"n": 7}
    assert cell["options"]["capacity_threshold"] == 0.5  # an option its flags set (eval_options)


def test_a_registered_task_draws_its_figures(count_task, tmp_path):
    pytest.importorskip("matplotlib")
    res = evaluate(InductionLM(vocab_size=64), CountConfig(3), options=EvalOptions(progress=False))
    (path,) = make_figures(res, tmp_path)  # its own figure; it gives no panel of the accuracy-vs-length figure
    assert path == tmp_path / "count.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in write_report(res, tmp_path / "report")} == {"results.json", "report.md", "count.png"}



def test_a_task_without_figures_draws_none(tmp_path):
    res = evaluate(InductionLM(vocab_size=259), LMDataConfig(seq_len=32),
                   options=EvalOptions(progress=False, lm_max_windows=1))
    assert res.cells[0].status == "ok" and make_figures(res, tmp_path) == []  # lm registers no figure
