"""The training loop: config validation, loss goes down, resume is bit-exact, DDP (gloo, 2 processes) equals one
process, FSDP2 runs on CPU."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnemos.layers import NeuralMemory
from mnemos.models import MemoryConfig, MnemosLM
from mnemos.checkpoint import load_model_weights, read_trainer_state
from mnemos.train.config import load_config
from mnemos.train.loop import train

TINY = [
    "model.variant=lmm", "model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.memory.chunk_size=8", "task.vocab_size=64", "task.seq_len=32", "task.num_kv_pairs=4",
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


def test_train_gives_the_process_its_deterministic_setting_back(tmp_path):
    """A CPU run uses deterministic algorithms inside train() only: the caller's setting is restored after it."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        train(_cfg(tmp_path, "run.steps=1"))
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


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
    # memory.qk_init only sets an initialisation: the checkpoint's weights win, so a run saved under the other one
    # (a run from before the successor init, resumed with today's default) resumes
    assert train(_cfg(tmp_path / "cut", *args, "model.memory.qk_init=random"), resume=True).step == 8


def test_resume_compares_only_what_the_variant_reads(tmp_path):
    """A transformer checkpoint resumes after memory.* or MAG's gate init changed (a transformer reads neither: the
    recall study hit this when the memory defaults changed under its runs); its window (read by swa, not by the
    transformer) does not matter either; a change of variant or of a field it reads is still refused."""
    args = ("model.variant=transformer", "run.steps=4")
    train(_cfg(tmp_path, *args, "run.stop_after=2"))
    for changed in ("model.memory.max_lr=0.01", "model.memory.max_chunk_lr=null", "model.mag_gate_bias=0.0",
                    "model.window=3"):
        train(_cfg(tmp_path, *args, changed, "run.stop_after=1"), resume=True)  # one more step, no refusal
    with pytest.raises(ValueError, match=r"\(model.rope_base\)"):
        train(_cfg(tmp_path, *args, "model.rope_base=500.0"), resume=True)
    with pytest.raises(ValueError, match=r"model.variant"):
        train(_cfg(tmp_path, "model.variant=swa", "run.steps=4"), resume=True)


def test_resume_reads_a_checkpoint_written_before_newer_config_keys(tmp_path):
    """A checkpoint whose saved config lacks keys added since (the memory rule's, the baselines' sections, hybrid
    layers) resumes: a missing key counts as the value that reproduces the saved model, not as a change (the recall
    study hit this); a real change is still refused."""
    import torch as _torch

    args = ("model.variant=mag", "run.steps=3")
    train(_cfg(tmp_path, *args, "run.stop_after=1"))
    f = tmp_path / "checkpoint" / "trainer.pt"
    state = _torch.load(f, weights_only=True)
    model = state["config"]["model"]
    for key in ("layers", "mamba2", "based", "mom", "mac_attn_init_scale"):
        model.pop(key, None)
    for key in ("rule", "momentum", "poly_degree", "loss", "window", "forget_bias"):
        model["memory"].pop(key, None)
    _torch.save(state, f)
    train(_cfg(tmp_path, *args, "run.stop_after=1"), resume=True)  # no refusal
    with pytest.raises(ValueError, match=r"\(model.memory.max_lr\)"):
        train(_cfg(tmp_path, *args, "model.memory.max_lr=0.01"), resume=True)


def test_every_variant_says_what_it_reads():
    from mnemos.models import VARIANTS
    from mnemos.models.config import variant_reads

    for v in VARIANTS:
        assert variant_reads(v, "d_model") and variant_reads(v, "variant")
    assert variant_reads("mag", "memory.max_lr") and not variant_reads("transformer", "memory.max_lr")
    assert variant_reads("swa", "window") and not variant_reads("transformer", "window")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_reads("titan", "d_model")


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
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script), str(out), *overrides]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        # Once in a full CI run (session 27, 2026-12-04) a rank died with SIGABRT and libstdc++'s "terminate called
        # without an active exception" under an FSDP run, in torch's teardown (pytorch/pytorch#90549 reports the same
        # abort in its own FSDP tests); it did not come back in six reruns. That signature alone gets one fresh retry.
        flake = r.returncode != 0 and "terminate called without an active exception" in r.stderr
        if not flake or attempt == 1:
            break
        for o in overrides:
            if o.startswith("run.out_dir="):
                shutil.rmtree(o.split("=", 1)[1], ignore_errors=True)
        out.unlink(missing_ok=True)
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

    # steps 1-2 apply, 3-5 overflow: the run stops at step 5 and saves the weights of step 2 and the loss curve
    calls.clear()
    poisoned.clear()
    poisoned.update(range(3, 100))
    monkeypatch.setattr(loop, "MAX_SKIPPED_IN_A_ROW", 3)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row .* weights of step 2 .* saved in .*checkpoint"):
        train(_cfg(tmp_path / "b", "run.steps=6"))
    assert (tmp_path / "b" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calls.clear()
    poisoned.clear()
    train(_cfg(tmp_path / "ref", "run.steps=6", "run.stop_after=2"))  # the same run, stopped cleanly after step 2
    saved, ref = (read_trainer_state(tmp_path / d / "checkpoint") for d in ("b", "ref"))
    assert saved["step"] == ref["step"] == 2 and saved["extra"] == {"diverged_at_step": 5}
    assert saved["scheduler"] == ref["scheduler"]  # the schedule of step 2, not advanced by the skipped steps
    assert saved["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
    a, b = (MnemosLM(_cfg(tmp_path).model) for _ in range(2))
    load_model_weights(tmp_path / "b" / "checkpoint", a)
    load_model_weights(tmp_path / "ref" / "checkpoint", b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_memory_that_overflows_is_a_skipped_step_not_a_crash(tmp_path, monkeypatch):
    """A test-time memory driven far past its stable step (free theta, max_lr 1e4, no chunk bound) overflows inside
    the forward. The
    layers pass no value checks to the op, so the overflow reaches the loss (not the second layer's op as a 'q
    contains NaN' input error), and the loop treats it as any non-finite step: skipped, then stopped as diverged."""
    import mnemos.train.loop as loop

    monkeypatch.setattr(loop, "MAX_SKIPPED_IN_A_ROW", 2)
    cfg = _cfg(tmp_path, "model.variant=mag", "model.n_layers=2", "model.memory.max_lr=10000.0",
               "model.memory.max_chunk_lr=null", "model.memory.ema_momentum=false", "run.steps=3")
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        train(cfg)


def _rows(path, split):
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_eval_scores_every_val_example_split_by_reach(tmp_path):
    """300 val examples in batches of 32 are all scored (1200 queries), and split at the reach of the configured
    window, n_layers * (window - 1), whatever the variant (lmm here)."""
    r = train(_cfg(tmp_path, "task.eval_examples=300", "run.batch_size=32", "run.steps=2", "run.eval_every=2",
                   "model.window=4"))
    (row,) = _rows(tmp_path, "val")
    assert row["val_examples"] == 300 and row["val_n"] == 300 * 4 and row["val_reach"] == 3
    assert row["val_n_near"] > 0 and row["val_n_near"] + row["val_n_far"] == 1200
    assert row["val_any_value_level"] == 0.25 and row["val_chance"] == 1 / 32
    assert 0 <= row["val_far_accuracy"] <= row["val_far_context_value_rate"] <= 1
    assert r.final_eval["val_accuracy"] == row["val_accuracy"] and "val_context_value_rate" in row


def test_progress_lines_and_memory_health_in_a_log_file(tmp_path, capsys, monkeypatch):
    """Piped to a file (stderr not a terminal) a run prints plain progress lines and one line per eval; logged steps
    (and only their forward) record each memory layer's health statistics into metrics.jsonl."""
    flags = []
    forward = NeuralMemory.forward

    def spy(self, *args, **kw):
        flags.append(self.record_stats)
        return forward(self, *args, **kw)

    monkeypatch.setattr(NeuralMemory, "forward", spy)
    args = ("model.n_layers=2", "run.steps=4", "run.log_every=2", "run.eval_every=4", "run.progress=true")
    train(_cfg(tmp_path, *args))
    train_flags, eval_flags = flags[:8], flags[8:]
    assert train_flags == [False, False, True, True] * 2 and eval_flags == [False] * 8  # 2 layers; eval: 4 batches
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(" loss ")[0] for line in lines[:2]] == ["step 2/4", "step 4/4"]
    assert "| mem step_max " in lines[0] and " write " in lines[0]
    assert lines[2].startswith("step 4/4 eval: val_loss ") and "ctx-val" in lines[2] and "(1/K 0.250)" in lines[2]
    rows = _rows(tmp_path, "train")
    assert [r["step"] for r in rows] == [2, 4] and all(r["skipped_steps"] == 0 for r in rows)
    for r in rows:
        for i in (0, 1):
            assert 0 < r[f"mem.{i}.step_max"] <= MemoryConfig().max_lr + 1e-6  # a token's step is bounded by max_lr
            assert 0 <= r[f"mem.{i}.write_fraction"] and r[f"mem.{i}.memory_norm"] > 0

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # on a terminal: a \r-bar, the eval on its own line
    train(_cfg(tmp_path / "tty", "run.steps=2", "run.eval_every=2", "run.progress=true"))
    err = capsys.readouterr().err
    assert "\r[############............] 1/2 loss" in err and "\nstep 2/2 eval: val_loss" in err


def test_progress_note_flags_a_memory_whose_inner_loss_rose():
    """A memory diverging inside the sequence leaves the outer loss finite (the layer's output is normalised), so the
    progress line names every layer whose inner loss rose over the sequence, NaN included, and no other."""
    from mnemos.train.loop import _memory_note

    mem = {"mem.0.step_max": 0.25, "mem.0.write_fraction": 0.5, "mem.0.inner_loss_start": 2.4, "mem.0.inner_loss": 0.8,
           "mem.1.step_max": 0.2, "mem.1.write_fraction": 0.7, "mem.1.inner_loss_start": 2.4, "mem.1.inner_loss": 450.0}
    note = _memory_note(mem, 0)
    assert "INNER LOSS ROSE mem.1 2.4->450" in note and "mem.0 " not in note.split("ROSE")[1]
    mem["mem.1.inner_loss"] = 1.0
    assert "ROSE" not in _memory_note(mem, 0)
    mem["mem.1.inner_loss_start"], mem["mem.1.inner_loss"] = 0.0036, 0.0038  # noise at a near-zero loss: not flagged
    assert "ROSE" not in _memory_note(mem, 0)
    mem["mem.0.inner_loss"] = float("nan")
    assert "ROSE mem.0 2.4->nan" in _memory_note(mem, 3) and _memory_note(mem, 3).endswith("| skipped 3")


@pytest.mark.parametrize("max_chunk_lr", ["null", "1.0"])
def test_a_chunk_of_64_diverged_inside_the_sequence_and_the_chunk_bound_trains_it(tmp_path, max_chunk_lr):
    """The MQAR preset's memory at chunk 64 and outer lr 1e-2: without a chunk bound (64 steps of up to 0.4 at one
    anchor) the memory's inner loss rises over the sequence from the first steps on while no step is skipped (the
    layer's output is normalised); with max_chunk_lr 1.0 it falls on every logged step."""
    cfg = load_config(None, [
        "model.variant=lmm", "model.vocab_size=256", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.memory.chunk_size=64", f"model.memory.max_chunk_lr={max_chunk_lr}", "task.vocab_size=256",
        "task.seq_len=128", "task.num_kv_pairs=8", "task.train_examples=512", "task.eval_examples=16",
        "run.batch_size=8", "run.steps=15", "run.log_every=5", "run.eval_every=1000", "run.progress=false",
        "optim.lr=1e-2", "optim.warmup_steps=5", f"run.out_dir={tmp_path}"])
    r = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ratios = [row[f"mem.{i}.inner_loss"] / row[f"mem.{i}.inner_loss_start"]
              for row in rows if row["split"] == "train" for i in range(1)]
    assert r.skipped_steps == 0 and len(ratios) == 3
    if max_chunk_lr == "null":
        assert max(ratios) > 1.5, ratios  # the memory diverges inside the sequence (measured: 1.21, 1.31, 2.21)
    else:
        assert max(ratios) < 1, ratios


def test_a_run_stops_at_the_first_eval_that_reaches_stop_at_accuracy(tmp_path, monkeypatch):
    """Zoology's early stop: evals every 2 steps score 0.5, 0.995, ... (planted); with run.stop_at_accuracy=0.99 the run
    stops after the step-4 eval with its checkpoint from step 4; at 0 (the default) it runs its whole schedule."""
    from mnemos.train import loop

    real = loop.validate
    scores = iter([0.5, 0.995, 0.3, 0.999, 0.2])

    def planted(*args, **kwargs):
        return {**real(*args, **kwargs), "val_accuracy": next(scores)}

    monkeypatch.setattr(loop, "validate", planted)
    r = train(_cfg(tmp_path / "stop", "run.steps=10", "run.eval_every=2", "run.stop_at_accuracy=0.99"))
    assert r.step == 4 and r.stopped_at_accuracy and len(r.train_losses) == 4
    assert [row["step"] for row in _rows(tmp_path / "stop", "val")] == [2, 4]
    assert read_trainer_state(tmp_path / "stop" / "checkpoint")["step"] == 4

    scores = iter([0.5, 0.995, 0.3, 0.999, 0.2])
    r = train(_cfg(tmp_path / "full", "run.steps=10", "run.eval_every=2"))
    assert r.step == 10 and not r.stopped_at_accuracy and len(_rows(tmp_path / "full", "val")) == 5
    with pytest.raises(ValueError, match=r"run.stop_at_accuracy must be in \[0, 1\]"):
        _cfg(tmp_path, "run.stop_at_accuracy=1.5")
    with pytest.raises(ValueError, match="run.stop_at_accuracy needs a task scored by accuracy"):
        load_config(None, ["task.kind=lm", "model.vocab_size=259", "run.stop_at_accuracy=0.9"])


@pytest.mark.parametrize("empty_ok", [False, True])
def test_loss_and_accuracy_equals_the_masked_mean_on_every_device_path(empty_ok):
    """The loss over labelled positions only (the CPU path selects those rows first): equal to the plain masked mean
    of -log softmax in float64, with the correct count and the gradient of every logit (zero where unlabelled)."""
    from mnemos.data import IGNORE_INDEX
    from mnemos.train.loop import loss_and_accuracy

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 11, 7, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.randint(0, 7, (3, 11), generator=g)
    labels[torch.rand(3, 11, generator=g) < 0.7] = IGNORE_INDEX
    labels[0, 0] = int(logits[0, 0].argmax())  # at least one correct, one labelled
    loss, correct, n = loss_and_accuracy(logits, labels, empty_ok=empty_ok)
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1)
    expected = -logp[mask].gather(-1, labels[mask].unsqueeze(-1)).sum() / mask.sum()
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0) and int(n) == int(mask.sum())
    assert int(correct) == int((logits.argmax(-1) == labels)[mask].sum()) >= 1
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, grad_expected, rtol=1e-10, atol=1e-15) and grad[~mask].abs().max() == 0
    none = torch.full_like(labels, IGNORE_INDEX)
    loss0, correct0, n0 = loss_and_accuracy(logits, none, empty_ok=empty_ok)
    assert int(n0) == 0 and int(correct0) == 0
    assert (loss0.item() == 0.0) if empty_ok else torch.isnan(loss0)


def test_loss_and_accuracy_gradients_are_bit_identical_to_the_full_masked_loss():
    """Selecting the labelled rows changes how the loss is summed (its value may differ in the last bit) but not one
    bit of the gradient, each logit's (p - y) / n: training runs are the same as with the full-tensor loss."""
    import torch.nn.functional as F

    from mnemos.data import IGNORE_INDEX
    from mnemos.train.loop import loss_and_accuracy

    g = torch.Generator().manual_seed(11)
    labels = torch.full((8, 96), IGNORE_INDEX)
    labels[:, 48::4] = torch.randint(0, 256, (8, 12), generator=g)
    x = torch.randn(8, 96, 256, generator=g)
    full, fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.cross_entropy(full.reshape(-1, 256), labels.reshape(-1), ignore_index=IGNORE_INDEX).backward()
    loss, _, _ = loss_and_accuracy(fast, labels)
    loss.backward()
    assert torch.equal(full.grad, fast.grad)
