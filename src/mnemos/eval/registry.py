"""The registry of evaluation tasks: one :class:`EvalTask` per task, everything the harness, the CLI and the report
need to know about it.

A task is a config type from :mod:`mnemos.data` (``config.build(seed)`` makes the data) plus what this class asks
for: the vocabulary its token ids need, how many tokens it feeds (the progress bar), how it turns a model into
cells (:meth:`EvalTask.evaluate`, usually through :class:`mnemos.eval.runner.GenerationTask`), its ``mnemos eval
TASK`` flags and the config (and harness options) they make, its section of ``report.md`` (built from
:mod:`mnemos.eval.tables`) and its figures (its own PNGs, and panels of the accuracy-vs-length figure the
length-swept tasks share; drawn with :mod:`mnemos.eval.plots`' helpers).

The tasks live in :mod:`mnemos.eval.tasks`, one module each, registered in that package's ``__init__`` in the order
the report shows them. To add a task: write ``eval/tasks/<name>.py`` with an ``EvalTask`` subclass and add it to
the registration there. This module imports nothing of :mod:`mnemos.eval`, so anything there (the report's tables
included) may read :data:`TASKS`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnemos.data import ByteTokenizer

if TYPE_CHECKING:  # annotations only
    from mnemos.eval.plots import LengthPanel
    from mnemos.eval.results import Cell, EvalResults
    from mnemos.eval.runner import EvalOptions, Run
    from mnemos.eval.tables import Notes

__all__ = ["EvalTask", "TASKS", "EvalTaskConfig", "config_from_dict", "config_to_dict", "floats_arg", "ints_arg",
           "register_task", "task_of"]

EvalTaskConfig = Any  # the config of a registered task (its EvalTask.config_type)

BYTE_VOCAB = ByteTokenizer().vocab_size  # the text tasks' token ids: UTF-8 bytes and the specials


class EvalTask:
    """One evaluation task. Subclasses set the attributes and implement the methods.

    Attributes:
        name: the cells' ``task`` and the ``mnemos eval`` subcommand.
        config_type: its config class (a dataclass with ``build(seed)``).
        help: one line for ``mnemos eval --help``.
        jrt: what JRT-Prompt (``mnemos eval --jrt``, :mod:`mnemos.eval.jrt`) repeats before the task's queries, in
            words; None when the task has no context separable from what it scores (``--jrt`` refuses it).
    """

    name: str
    config_type: type
    help: str = ""
    jrt: str | None = None

    def vocab_size(self, config: EvalTaskConfig) -> int:
        """The vocabulary a model needs for the task's token ids (default: byte tokens, for the text tasks)."""
        return BYTE_VOCAB

    def tokens(self, config: EvalTaskConfig, options: EvalOptions) -> int:
        """Roughly how many tokens evaluating ``config`` feeds (the progress bar's total)."""
        raise NotImplementedError

    def evaluate(self, run: Run) -> list[Cell]:
        """The cells of one model on ``run.config`` (each through ``run.guarded``, so a failure stays in its cell)."""
        raise NotImplementedError

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The task's ``mnemos eval NAME`` flags (the common ones are added by the CLI)."""

    def from_args(self, args: argparse.Namespace) -> EvalTaskConfig | list[EvalTaskConfig]:
        """The config(s) a command line describes."""
        raise NotImplementedError

    def eval_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """The :class:`~mnemos.eval.runner.EvalOptions` fields the task's flags set (none by default)."""
        return {}

    def section(self, results: EvalResults, notes: Notes) -> list[str]:
        """The task's markdown section of the report (lines; none when ``results`` has no cell of the task)."""
        return []

    def figures(self, results: EvalResults, out_dir: Path) -> list[Path]:
        """The task's own figures: PNGs written into ``out_dir`` from its cells in ``results`` (none by default, and
        none when there is nothing to draw). :mod:`mnemos.eval.plots` has the helpers; matplotlib is imported only
        when a figure is drawn, and its absence is an ImportError."""
        return []

    def length_panels(self, results: EvalResults) -> list[LengthPanel]:
        """The task's panels of the accuracy-vs-context-length figure the length-swept tasks share
        (:func:`mnemos.eval.plots.plot_accuracy_vs_length`); none by default."""
        return []


TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask) -> EvalTask:
    """Add ``task`` (a name and a config type may each be registered once)."""
    if not isinstance(task, EvalTask):
        raise TypeError(f"task must be an EvalTask, got {type(task).__name__}")
    if task.name in TASKS or any(t.config_type is task.config_type for t in TASKS.values()):
        raise ValueError(f"task {task.name!r} (config {task.config_type.__name__}) is already registered")
    TASKS[task.name] = task
    return task


def config_to_dict(config: EvalTaskConfig) -> dict[str, Any]:
    """``{"type": "NIAHConfig", <fields>}``, JSON-ready (tuples as lists); :func:`config_from_dict` inverts it."""
    task_of(config)  # a TypeError unless it is a registered task's config
    d = {"type": type(config).__name__}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def config_from_dict(d: dict[str, Any]) -> EvalTaskConfig:
    """The task config :func:`config_to_dict` wrote (lists back to tuples; the config validates itself)."""
    by_type = {t.config_type.__name__: t.config_type for t in TASKS.values()}
    cls = by_type.get(d.get("type"))
    if cls is None:
        raise ValueError(f"unknown task config type {d.get('type')!r}; expected one of {sorted(by_type)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "type"}
    return cls(**kwargs)


def task_of(config: EvalTaskConfig) -> EvalTask:
    """The registered task whose config type ``config`` is; a ``TypeError`` naming the known configs otherwise."""
    for task in TASKS.values():
        if type(config) is task.config_type:
            return task
    raise TypeError(f"not a task config: {type(config).__name__}; expected one of "
                    f"{', '.join(t.config_type.__name__ for t in TASKS.values())}")


# argparse types the tasks' flags share


def ints_arg(text: str) -> tuple[int, ...]:
    """``"1024,4096"`` -> (1024, 4096)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats_arg(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
