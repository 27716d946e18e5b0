"""The evaluation harness: run :class:`~mnemos.eval.stateful.StatefulLM` models on the offline tasks of
:mod:`mnemos.data` and record one :class:`~mnemos.eval.results.Cell` per grid point.

The tasks are registered in :mod:`mnemos.eval.tasks` (one module each, :class:`~mnemos.eval.registry.EvalTask`,
which says what it measures: MQAR's teacher-forced recall, S-NIAH, BABILong and passkey capacity by greedy decoding,
LM loss); what their evaluations share (options, refusals, streaming, greedy decoding) is :mod:`mnemos.eval.runner`.

Every context is fed through ``model.forward`` ``stream_chunk`` tokens at a time with the state carried, so a
model with a constant-size state reads a haystack of millions of tokens in constant memory. A model whose state
grows (attention) is refused, with the reason recorded in the cell, when a context exceeds its ``max_context`` or
its state would exceed ``memory_budget_gb``; a cell that fails anyway (out of memory, an exception in the model)
is recorded as an error and the other cells still run (``raise_errors=True`` to stop instead). Samples
of equal length are batched (``batch_size``).

>>> from mnemos.data import MQARConfig
>>> from mnemos.eval.reference_models import InductionLM
>>> res = evaluate(InductionLM(vocab_size=64), MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4,
...                num_examples=8, noise="disjoint"), options=EvalOptions(progress=False))
>>> res.cells[0].task, res.cells[0].metrics["accuracy"], res.cells[0].metrics["context_value_rate"]
('mqar', 1.0, 1.0)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from mnemos.eval._progress import progress_bar
from mnemos.eval.adapters import load_model
from mnemos.eval.registry import EvalTaskConfig, config_from_dict, config_to_dict, task_of
from mnemos.eval.report import write_report
from mnemos.eval.results import Cell, EvalResults
from mnemos.eval.runner import EvalOptions, Run, auto_memory_budget_gb
from mnemos.eval.stateful import StatefulLM
import mnemos.eval.tasks  # noqa: F401  (registers the tasks that task_of and config_from_dict look up)
from mnemos.eval.tasks.mqar import model_reach

__all__ = [
    "EvalOptions",
    "EvalTaskConfig",
    "auto_memory_budget_gb",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "model_reach",
    "run_eval",
    "task_name",
    "task_vocab_size",
]


def task_name(config: EvalTaskConfig) -> str:
    """The registered name of ``config``'s task (``"niah"`` for a ``NIAHConfig``)."""
    return task_of(config).name


def task_vocab_size(config: EvalTaskConfig) -> int:
    """The vocabulary a model needs for ``config``'s token ids (byte tokens for the text tasks)."""
    return task_of(config).vocab_size(config)


# -- the entry points -----------------------------------------------------------------------------------------------

def evaluate(
    model: StatefulLM | Sequence[StatefulLM],
    task: EvalTaskConfig | Sequence[EvalTaskConfig],
    *,
    seed: int = 0,
    options: EvalOptions | None = None,
) -> EvalResults:
    """Run every model on every task config (``task.build(seed)`` makes the data) and return the cells.

    ``model``: one :class:`~mnemos.eval.stateful.StatefulLM` or several (wrap mnemos models in
    :class:`~mnemos.eval.adapters.MnemosLMAdapter`). ``task``: one config or several (e.g. an MQAR grid from
    :func:`mnemos.data.mqar_grid`). Cells come out model by model, then task by task, in grid order.
    """
    options = options or EvalOptions()
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if not models or not tasks:
        raise ValueError(f"need at least one model and one task, got {len(models)} and {len(tasks)}")
    for m in models:
        if not isinstance(m, StatefulLM):
            hint = " (wrap it: MnemosLMAdapter(model))" if hasattr(m, "init_cache") else ""
            raise TypeError(f"models must be StatefulLM instances, got {type(m).__name__}{hint}")
    for t in tasks:
        task_of(t)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    cells: list[Cell] = []
    for m in models:
        total = sum(task_of(t).tokens(t, options) for t in tasks)
        bar = progress_bar(total, m.name, options.progress)
        try:
            for t in tasks:
                cells.extend(task_of(t).evaluate(Run(m, t, seed, options, bar, models)))
        finally:
            bar.close()
    return EvalResults(cells)


def run_eval(
    model_specs: Sequence[str],
    task: EvalTaskConfig | Sequence[EvalTaskConfig],
    *,
    seed: int = 0,
    options: EvalOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    plots: bool = True,
) -> EvalResults:
    """What ``mnemos eval`` does: load each model spec (:func:`~mnemos.eval.adapters.load_model`), evaluate, and
    write ``results.json``, ``report.md`` and the figures to ``out_dir`` (when given)."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if not model_specs:
        raise ValueError("give at least one model")
    vocab = max(task_vocab_size(t) for t in tasks)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_model(s, vocab_size=vocab, device=device, dtype=dtype) for s in model_specs]
    results = evaluate(models, tasks, seed=seed, options=options)
    if out_dir is not None:
        write_report(results, out_dir, plots=plots)
    return results
