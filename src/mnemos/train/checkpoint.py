"""Writing checkpoints and resuming from them: the model in safetensors, everything else (optimizer, scheduler, step,
RNG, config) in a torch file that loads with ``weights_only=True``, written atomically. The format and its readers,
which evaluation shares: :mod:`mnemos.checkpoint`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import (  # the format and its readers (load_checkpoint reads through them)
    CONFIG_FILE,
    FORMAT,
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointError,
    load_model_weights,
    read_trainer_state,
)


def rng_state() -> dict[str, Any]:
    """The state of every RNG a training run draws from, as tensors and ints (safe for ``weights_only`` loading)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
        "python": [int(py_version), list(py_keys), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    py_version, py_keys, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(py_keys), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | dict[str, torch.Tensor],
    *,
    step: int,
    optimizer: torch.optim.Optimizer | dict | None = None,
    scheduler: Any = None,
    best_metric: float | None = None,
    config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a crash mid-write leaves the previous checkpoint intact).

    ``model`` and ``optimizer`` may be given as modules or as (full, gathered) state dicts, e.g. from
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` under FSDP.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(_unique_tensors(model.state_dict() if isinstance(model, nn.Module) else model), str(tmp / MODEL_FILE))
        opt_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        trainer = {
            "format": FORMAT,
            "step": int(step),
            "best_metric": None if best_metric is None else float(best_metric),
            "optimizer": opt_state,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": rng_state(),
            "config": config,
            "extra": extra or {},
        }
        torch.save(trainer, tmp / TRAINER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config or {}, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per storage (tied weights are stored once, under their first name), contiguous, on the CPU."""
    out, seen = {}, set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Restore model (and optimizer, scheduler, RNG when given) from a checkpoint; returns the trainer state dict
    (step, best_metric, config, extra)."""
    state = read_trainer_state(path)
    load_model_weights(path, model)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from None
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
