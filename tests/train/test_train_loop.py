"""The training loop: config validation, loss goes down, resume is bit-exact, DDP (gloo, 2 processes) equals one
process, FSDP2 runs on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnemos.train.config import load_config
from mnemos.train.loop import train

TINY = [
    "model.variant=lmm", "model.vocab_size=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.memory.chunk_size=8", "task.vocab_size=32", "task.seq_len=32", "task.num_kv_pairs=4",
    "task.train_examples=256", "task.eval_examples=32", "run.batch_size=8", "run.eval_every=1000",
    "run.progress=false", "optim.warmup_steps=2",
]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"run.out_dir={tmp_path}"] + list(extra))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config sections"):
        load_config(None, ["modle.d_model=3"])
    with pytest.raises(ValueError, match="unknown MnemosConfig keys"):
        load_config(None, ["model.widht=3"])
    with pytest.raises(TypeError, match="optim.lr must be of type float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="run.batch_size .* divisible by optim.grad_accum"):
        load_config(None, ["run.batch_size=6", "optim.grad_accum=4"])
    with pytest.raises(ValueError, match="model.vocab_size"):
        load_config(None, ["model.vocab_size=16", "task.vocab_size=64"])
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\nrun:\n  steps: 7\n")
    cfg = load_config(tmp_path / "c.yaml", ["run.steps=9"])
    assert cfg.optim.lr == 1e-3 and cfg.run.steps == 9
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_trains_logs_and_checkpoints(tmp_path):
    r = train(_cfg(tmp_path, "run.steps=30", "optim.lr=1e-2"))
    assert len(r.train_losses) == 30
    assert sum(r.train_losses[-5:]) / 5 < 0.9 * sum(r.train_losses[:5]) / 5
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(row["split"] == "val" and "val_accuracy" in row for row in rows)
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_bit_exact(tmp_path):
    """Stopping after 5 of 8 steps and resuming gives exactly the losses of the uninterrupted run (CPU)."""
    args = ("run.steps=8", "optim.grad_accum=2", "optim.lr=1e-2")
    full = train(_cfg(tmp_path / "full", *args))
    first = train(_cfg(tmp_path / "cut", *args, "run.stop_after=5"))
    assert first.step == 5 and first.train_losses == full.train_losses[:5]
    rest = train(_cfg(tmp_path / "cut", *args), resume=True)
    assert rest.step == 8 and rest.train_losses == full.train_losses[5:]
    with pytest.raises(ValueError, match=r"different model config \(model.d_model\)"):
        train(_cfg(tmp_path / "cut", *args, "model.d_model=16"), resume=True)
    with pytest.raises(ValueError, match=r"\(model.memory.ema_momentum\)"):
        train(_cfg(tmp_path / "cut", *args, "model.memory.ema_momentum=false"), resume=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, overrides: list[str]) -> list[float]:
    """Run train() under torchrun with 2 CPU processes (gloo); returns the losses rank 0 saw."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "from mnemos.train.config import load_config\n"
        "from mnemos.train.loop import train\n"
        "r = train(load_config(None, sys.argv[2:]))\n"
        "if r.out_dir.joinpath('config.json').exists():\n"
        "    open(sys.argv[1], 'w').write(json.dumps(r.train_losses))\n"
    )
    out = tmp_path / "losses.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out), *overrides]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    """gloo, 2 ranks, same global batch: the losses equal the single-process run within float tolerance."""
    args = TINY + ["run.steps=3", "run.device=cpu", f"run.parallel={parallel}"]
    torch.set_num_threads(1)
    single = train(load_config(None, args + [f"run.out_dir={tmp_path / 'one'}"])).train_losses
    multi = _torchrun(tmp_path, args + [f"run.out_dir={tmp_path / 'two'}"])
    assert len(multi) == 3
    torch.testing.assert_close(torch.tensor(multi), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_cli_train_with_preset_and_overrides(tmp_path, capsys):
    from mnemos.cli import main

    args = ["train", "--preset", "mqar", "--model.variant=lmm", "model.d_model=32", "model.n_layers=1",
            "task.train_examples=64", "task.eval_examples=16", "run.steps=2", "run.progress=false",
            f"run.out_dir={tmp_path}"]
    assert main(args) == 0
    assert "2 steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["variant"] == "lmm" and saved["model"]["d_model"] == 32 and saved["task"]["seq_len"] == 128
    assert main(["train", "--preset", "mqar", "model.d_modle=3"]) == 2
    assert "d_modle" in capsys.readouterr().err


def test_steps_with_non_finite_gradients_are_skipped(tmp_path, monkeypatch):
    """A batch whose loss overflows leaves the weights untouched (the update is skipped and counted); a run that
    keeps overflowing stops with FloatingPointError instead of training on NaN."""
    import mnemos.train.loop as loop

    real = loop.loss_and_accuracy
    poisoned = {2, 3}
    calls = []

    def loss_and_accuracy(logits, labels):
        calls.append(1)
        loss, correct, n = real(logits, labels)
        return (loss * float("nan") if len(calls) in poisoned else loss), correct, n

    monkeypatch.setattr(loop, "loss_and_accuracy", loss_and_accuracy)
    r = train(_cfg(tmp_path, "run.steps=6", "optim.lr=1e-2"))
    assert r.skipped_steps == 2 and r.step == 6
    assert [torch.isnan(torch.tensor(x)).item() for x in r.train_losses] == [False, True, True, False, False, False]
    assert all(torch.isfinite(torch.tensor(x)) for x in r.train_losses[3:])  # the weights were never poisoned

    calls.clear()
    poisoned.update(range(1, 100))
    monkeypatch.setattr(loop, "MAX_SKIPPED_IN_A_ROW", 3)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        train(_cfg(tmp_path / "b", "run.steps=6"))


def test_a_memory_that_overflows_is_a_skipped_step_not_a_crash(tmp_path, monkeypatch):
    """A test-time memory driven far past its stable step (free theta, max_lr 1e4) overflows inside the forward. The
    layers pass no value checks to the op, so the overflow reaches the loss (not the second layer's op as a 'q
    contains NaN' input error), and the loop treats it as any non-finite step: skipped, then stopped as diverged."""
    import mnemos.train.loop as loop

    monkeypatch.setattr(loop, "MAX_SKIPPED_IN_A_ROW", 2)
    cfg = _cfg(tmp_path, "model.variant=mag", "model.n_layers=2", "model.memory.max_lr=10000.0",
               "model.memory.ema_momentum=false", "run.steps=3")
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        train(cfg)
