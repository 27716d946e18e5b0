"""``optim.write_penalty``: the trainer adds lambda x the mean over the model's neural memories and tokens of each
token's write strength (theta / its bound, in [0, 1]) to the loss it backpropagates. Checked against the training
written out by hand with the write strength taken from each memory layer's own projection (a forward hook on its
input), on memory variants whose memories sit at different depths of the block; the penalty lowers the writes;
bad values and a model without a memory are refused by name."""

from __future__ import annotations

import pytest
import torch

from mnemos.checkpoint import load_model_weights
from mnemos.layers import NeuralMemory
from mnemos.models import MnemosLM
from mnemos.train.config import load_config
from mnemos.train.loop import TaskData, loss_and_accuracy, train
from mnemos.train.optim import build_optimizer, build_scheduler

TINY = [
    "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.window=6",
    "model.memory.chunk_size=4", "task.vocab_size=64", "task.seq_len=16", "task.num_kv_pairs=4",
    "task.noise=disjoint", "task.train_examples=256", "task.eval_examples=16", "run.batch_size=4",
    "run.eval_every=1000", "run.progress=false", "optim.warmup_steps=2", "optim.lr=1e-2",
]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"run.out_dir={tmp_path}"] + list(extra))


def _by_hand(cfg) -> list[float]:
    """The trainer's loop for one-window MQAR, its loss plus lambda x the mean over memories of mean(theta / bound),
    theta recomputed from each memory's input by its own projection. Returns the logged (language-model) losses."""
    torch.manual_seed(cfg.run.seed)
    model = MnemosLM(cfg.model)
    opt = build_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                          betas=(cfg.optim.beta1, cfg.optim.beta2))
    sched = build_scheduler(opt, warmup=cfg.optim.warmup_steps, total=cfg.run.steps, min_ratio=cfg.optim.min_lr_ratio)
    data = TaskData(cfg)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    seen: list = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0]))) for m in memories]
    losses = []
    try:
        for step in range(cfg.run.steps):
            x, y = data.batch(step, cfg.run.batch_size, cfg.run.seed)
            seen.clear()
            logits, _ = model(x)
            loss, _, _ = loss_and_accuracy(logits, y)
            strength = [mod._project(inp, None)[3] / mod.token_lr for mod, inp in seen]
            assert len(strength) >= len(memories)  # MAC calls its memory once per segment
            (loss + cfg.optim.write_penalty * torch.stack([s.mean() for s in strength]).mean()).backward()
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad()
    finally:
        for h in hooks:
            h.remove()
    return losses


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_the_trainer_adds_lambda_times_the_mean_write_strength(tmp_path, variant):
    args = (f"model.variant={variant}", "run.steps=3", "optim.write_penalty=5.0",
            "model.segment_len=8")  # MAC: two segments of a 16-token sequence, two calls of each memory
    got = train(_cfg(tmp_path / "a", *args)).train_losses
    assert got == pytest.approx(_by_hand(_cfg(tmp_path, *args)), rel=1e-5, abs=1e-6)
    plain = train(_cfg(tmp_path / "b", *args[:2], args[3])).train_losses
    assert got[0] == plain[0] and got[1:] != plain[1:]  # the penalty is in the update, not in the logged loss


def test_the_penalty_lowers_the_writes(tmp_path):
    strengths = []
    for lam in (0.0, 3.0):
        cfg = _cfg(tmp_path / f"l{lam}", "model.variant=lmm", "run.steps=15", f"optim.write_penalty={lam}",
                   "run.save_every=15")
        train(cfg)
        model = MnemosLM(cfg.model)
        load_model_weights(tmp_path / f"l{lam}" / "checkpoint", model)
        x, _ = TaskData(cfg).batch(0, 8, 1)
        for m in model.modules():
            if isinstance(m, NeuralMemory):
                m.track_writes = True
        with torch.no_grad():
            model(x)
        strengths.append(torch.stack([m.write_strengths[-1] for m in model.modules() if isinstance(m, NeuralMemory)]))
    assert (strengths[1] < strengths[0] - 0.05).all(), strengths


def test_bad_values_and_a_model_without_memory_are_refused(tmp_path):
    for bad in ("-0.1", ".nan", ".inf"):  # YAML spellings of NaN and infinity
        with pytest.raises(ValueError, match="optim.write_penalty must be a finite number >= 0"):
            _cfg(tmp_path, f"optim.write_penalty={bad}")
    with pytest.raises(ValueError, match="optim.write_penalty=0.5 needs a model with a neural memory; 'transformer'"):
        train(_cfg(tmp_path, "model.variant=transformer", "run.steps=1", "optim.write_penalty=0.5"))
