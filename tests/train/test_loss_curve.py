"""loss_curve.png shows the whole run, also after --resume: the earlier steps are read back from the run's logs."""

from __future__ import annotations

import json

import pytest

from mnemos.train.config import load_config
from mnemos.train.loop import _write_curve, train

TINY = [
    "model.variant=swa", "model.vocab_size=64", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
    "model.window=8", "task.vocab_size=64", "task.seq_len=32", "task.num_kv_pairs=4", "task.train_examples=64",
    "task.eval_examples=8", "run.batch_size=4", "run.eval_every=1000", "run.progress=false", "optim.warmup_steps=1",
    "run.steps=6", "run.log_every=1",
]


def test_resumed_run_plots_every_step(tmp_path):
    pytest.importorskip("matplotlib")
    from figure_checks import saved_figures

    cfg = load_config(None, TINY + [f"run.out_dir={tmp_path}"])
    first = train(load_config(None, TINY + [f"run.out_dir={tmp_path}", "run.stop_after=3"]))
    with saved_figures() as figures:
        rest = train(cfg, resume=True)
    assert (first.step, rest.step) == (3, 6)
    line = figures[-1].axes[0].lines[0]  # the curve (then the resume marker)
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5, 6]  # not only the resumed steps 4..6
    assert list(line.get_ydata()) == first.train_losses + rest.train_losses  # logged every step: the same numbers
    assert (tmp_path / "loss_curve.png").is_file()


def test_earlier_steps_come_from_the_logs(tmp_path):
    """The last record of a step logged twice wins, a line cut by a kill is skipped, val records and steps after the
    resume point are left out; metrics.csv serves when metrics.jsonl is missing."""
    records = [{"step": 10, "split": "train", "loss": 3.0}, {"step": 20, "split": "train", "loss": 2.5},
               {"step": 20, "split": "val", "val_loss": 9.0}, {"step": 30, "split": "train", "loss": 2.4},
               {"step": 20, "split": "train", "loss": 2.0}]  # step 20 again: resumed from step 10's checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4')
    steps, losses = _write_curve(tmp_path, 20, [1.5, 1.4])
    assert (steps, losses) == ([10, 20, 21, 22], [3.0, 2.0, 1.5, 1.4])
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.csv").write_text("step,split,loss,accuracy,lr,tokens_per_s\n10,train,3.0,,0.1,5\n"
                                          "20,val,9.0,0.5,,\n20,train,2.5,,0.1,5\n")
    assert _write_curve(tmp_path, 20, [1.5]) == ([10, 20, 21], [3.0, 2.5, 1.5])
    assert _write_curve(tmp_path, 0, [1.5]) == ([1], [1.5])  # a fresh run reads nothing back
