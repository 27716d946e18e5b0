"""Evaluation results: one :class:`Cell` per measured grid point, gathered in :class:`EvalResults`, stored as JSON.

A cell is self-contained: it carries the seed, the full task config, the model's description, the evaluation
options and the software versions (mnemos, torch, python, git commit), so cells from different runs and machines can
be merged into one report without losing where each number came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mnemos import __version__
from mnemos.eval.tables import markdown_report

__all__ = ["Cell", "CellStatus", "EvalResults", "SCHEMA", "TaskName", "environment"]

SCHEMA = "mnemos.eval.results/1"
TaskName = str  # a registered task's name (mnemos.eval.tasks: "mqar", "niah", "babilong", "capacity", "lm")
CellStatus = Literal["ok", "refused", "error"]


@dataclass
class Cell:
    """One grid point of one task for one model.

    ``params`` says where in the task's grid the cell sits (``{"length": 4096, "depth": 0.5}`` for NIAH,
    ``{"seq_len": 256, "num_kv_pairs": 16, ...}`` for MQAR); ``metrics`` holds the numbers (``accuracy``,
    ``correct``, ``n``; for MQAR also the near / far split and context-value counts of
    :func:`mnemos.data.mqar_recall_metrics`; ``loss``, ``perplexity`` for LM; ``state_numel`` / ``state_bytes`` per
    sequence after the prompt). ``status`` is ``"ok"``, ``"refused"`` (the model cannot take this context: ``message`` says why) or
    ``"error"`` (it failed while running, e.g. out of memory). ``samples`` lists per-prompt predictions for the
    generation tasks.
    """

    task: TaskName
    model: dict[str, Any]
    seed: int
    task_config: dict[str, Any]
    params: dict[str, Any]
    status: CellStatus = "ok"
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", "?"))

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown cell keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**d)


@dataclass
class EvalResults:
    """A list of cells; ``save`` / ``load`` JSON, ``merge`` runs, ``markdown`` for the comparison tables."""

    cells: list[Cell] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "cells": [c.to_dict() for c in self.cells]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResults:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a mnemos results file: schema {d.get('schema')!r}, expected {SCHEMA!r}")
        return cls(cells=[Cell.from_dict(c) for c in d["cells"]])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResults:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def merge(self, *others: EvalResults) -> EvalResults:
        """All cells of self and ``others`` in order; a cell identical to one already present is kept once."""
        seen: set[str] = set()
        cells = []
        for res in (self, *others):
            for c in res.cells:
                key = json.dumps(c.to_dict(), sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    cells.append(c)
        return EvalResults(cells)

    def of_task(self, task: str) -> list[Cell]:
        return [c for c in self.cells if c.task == task]

    def markdown(self) -> str:
        """Comparison tables, one section per task (see :func:`mnemos.eval.tables.markdown_report`)."""
        return markdown_report(self)


def _jsonable(x: Any) -> Any:
    """Tuples -> lists, numpy / torch scalars -> Python numbers, non-finite floats -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, torch.Tensor)):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


@functools.cache
def _git_info() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout mnemos was imported from, or (None, None) outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=5)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and machine: mnemos, torch, numpy, python, platform, git commit (and whether the tree was dirty),
    the device name (the GPU's model for CUDA), and the number of CPU threads torch uses."""
    commit, dirty = _git_info()
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "mnemos": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
    }
