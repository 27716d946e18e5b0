"""The task registry: a task registered from outside the package (one class, one registration) is evaluated by the
harness, gets its ``mnemos eval`` subcommand and flags, and writes its report section; the built-in tasks are the
registered ones, in the report's order."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from mnemos.cli import main
from mnemos.data import PasskeyCapacityConfig
from mnemos.eval import EvalOptions, InductionLM, evaluate
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

    def from_args(self, args):
        return CountConfig(args.n)

    def section(self, results, notes):
        points = pool(results, self.name)
        return ["## Count", "", *table(["model", "accuracy"], [[m, notes.mark(p, acc)] for m, p in
                                                               zip(model_names(points), points)]), ""] if points else []


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

    assert main(["eval", "count", "--n", "7", "--model", "baseline:random", "--no-progress", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    assert "## Count" in capsys.readouterr().out
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cell["task"] == "count" and cell["params"] == {"n": 7}
