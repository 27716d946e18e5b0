"""The checkpoint format, and reading it: what training (to resume) and evaluation (to load a model) share.

A checkpoint is a directory that training writes (:func:`mnemos.train.checkpoint.save_checkpoint`, atomically):

    model.safetensors   model weights (tied weights stored once)
    trainer.pt          {"format": 1, "step", "best_metric", "optimizer", "scheduler", "rng", "config", "extra"},
                        loadable with ``weights_only=True``
    config.json         the resolved run config (also in trainer.pt's "config"), human readable

Read with errors that say what is wrong (:class:`CheckpointError`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["CONFIG_FILE", "FORMAT", "MODEL_FILE", "TRAINER_FILE", "CheckpointError", "load_model_weights",
           "read_trainer_state"]

FORMAT = 1
MODEL_FILE, TRAINER_FILE, CONFIG_FILE = "model.safetensors", "trainer.pt", "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def read_trainer_state(path: str | os.PathLike) -> dict:
    """Load ``trainer.pt`` of a checkpoint (weights_only) and check its format."""
    path = Path(path)
    f = path / TRAINER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a mnemos checkpoint: {TRAINER_FILE} is missing")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle
        raise CheckpointError(f"{f} is corrupt or not a mnemos trainer state: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{f} has format {state.get('format') if isinstance(state, dict) else '?'}, expected {FORMAT}")
    return state


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load ``model.safetensors`` into model, strictly: every missing, unexpected or mis-shaped tensor is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    f = path / MODEL_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a mnemos checkpoint: {MODEL_FILE} is missing")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is corrupt: {e}") from None
    own = model.state_dict()
    # tied weights are stored once (safetensors' save_model keeps one name per storage)
    shared = {}
    for name, t in own.items():
        shared.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    stored_alias = {}
    for names in shared.values():
        for n in names:
            stored_alias[n] = next((m for m in names if m in tensors), n)
    missing = [n for n in own if stored_alias[n] not in tensors]
    unexpected = [n for n in tensors if n not in own]
    mismatched = [
        f"{n}: checkpoint {tuple(tensors[stored_alias[n]].shape)} vs model {tuple(t.shape)}"
        for n, t in own.items()
        if stored_alias[n] in tensors and tuple(tensors[stored_alias[n]].shape) != tuple(t.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            parts.append(f"shape mismatch {mismatched[:8]}")
        raise CheckpointError(f"{f} does not fit this model: " + "; ".join(parts))
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(tensors[stored_alias[n]])
