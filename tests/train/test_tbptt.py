"""Truncated BPTT in training (``run.carry_state``, ``task.doc_windows``): one window per document is the training
without documents; a document read as carried windows is the forward over the whole document, for every variant; a
step's gradient stops at its window's start; resuming mid-document is bit-exact; the config errors name their key."""

from __future__ import annotations

import math

import pytest
import torch

from mnemos.checkpoint import load_model_weights
from mnemos.data import IGNORE_INDEX
from mnemos.models import VARIANTS, MnemosConfig, MnemosLM
from mnemos.train.config import load_config
from mnemos.train.loop import TaskData, carried_forward, loss_and_accuracy, train
from mnemos.train.optim import build_optimizer, build_scheduler

TINY = [
    "model.variant=lmm", "model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "model.window=6", "model.memory.chunk_size=8", "task.vocab_size=64", "task.seq_len=16", "task.num_kv_pairs=4",
    "task.noise=disjoint", "task.power_a=1.0", "task.train_examples=256", "task.eval_examples=16",
    "run.batch_size=4", "run.eval_every=1000", "run.progress=false", "optim.warmup_steps=2", "optim.lr=1e-2",
]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"run.out_dir={tmp_path}"] + list(extra))


def _by_hand(cfg) -> tuple[list[float], MnemosLM, tuple[float, float]]:
    """The training of ``cfg`` written out (one process): step s reads windows ``g K ... g K + K - 1`` (K =
    ``run.carry_grad_windows``, g = ``s % (doc_windows / K)``) of the documents ``TaskData.batch(d * grad_accum + m)``,
    d = ``s // (doc_windows / K)``, micro-batch m from the state after the window before (detached at the step's
    start, carried with its gradient between the step's windows), or from none at a document's start; the loss is the
    mean over the labelled positions of the step's windows. Returns the losses, the model, and the loss of the last
    window of the last step's first micro-batch read from a fresh state and as trained."""
    torch.manual_seed(cfg.run.seed)
    model = MnemosLM(cfg.model)
    opt = build_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                          betas=(cfg.optim.beta1, cfg.optim.beta2))
    sched = build_scheduler(opt, warmup=cfg.optim.warmup_steps, total=cfg.run.steps, min_ratio=cfg.optim.min_lr_ratio)
    data, T, W, A = TaskData(cfg), cfg.task.seq_len, cfg.task.doc_windows, cfg.optim.grad_accum
    K = cfg.run.carry_grad_windows  # windows per step, the state's gradient spanning them
    carry = cfg.run.carry_state and W > 1
    losses, states, last = [], [None] * A, (0.0, 0.0)
    for step in range(cfg.run.steps):
        d, g = divmod(step, W // K)
        step_loss = torch.zeros(())
        at = slice(g * K * T, (g + 1) * K * T)  # the step's windows
        batches = [data.batch(d * A + m, cfg.run.batch_size // A, cfg.run.seed) for m in range(A)]
        if not any((labels[:, at] != IGNORE_INDEX).any() for _, labels in batches):
            # nothing labelled in the step's windows: read on (carried) without a graph, no update
            for m in range(A if carry else 0):
                with torch.no_grad():
                    state = states[m] if g else model.init_cache(batches[m][0].shape[0])
                    for w in range(K):
                        _, state = model(batches[m][0][:, at][:, w * T : (w + 1) * T], state)
                    states[m] = state.detach()
            losses.append(0.0)
            opt.step()  # no parameter has a gradient: AdamW moves nothing (called, as the trainer does)
            sched.step()
            continue
        for m in range(A):
            inputs, labels = batches[m]
            x, y = inputs[:, at], labels[:, at]
            if m == 0:
                with torch.no_grad():
                    fresh_loss = loss_and_accuracy(model(x[:, -T:])[0], y[:, -T:], empty_ok=W > 1)[0].item()
            if carry:
                state = states[m] if g else model.init_cache(x.shape[0])
                parts = []
                for w in range(K):
                    logits, state = model(x[:, w * T : (w + 1) * T], state)
                    parts.append(logits)
                states[m] = state.detach()
                logits = torch.cat(parts, 1)
            else:
                logits, _ = model(x)
            if m == 0 and carry:
                last_carried = logits[:, -T:].detach()
            loss, _, _ = loss_and_accuracy(logits, y, empty_ok=W > 1)
            if m == 0:
                last = (fresh_loss, loss_and_accuracy(last_carried, y[:, -T:], empty_ok=W > 1)[0].item()
                        if carry else loss.item())
            (loss / A).backward()
            step_loss += loss.detach() / A
        losses.append(step_loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses, model, last


@pytest.mark.parametrize("variant", ["lmm", "mag"])
def test_one_window_per_document_is_todays_training(tmp_path, variant):
    """carry_state with documents of one window: every step starts from a fresh state, so the losses are those of
    training without it (the batches of steps s * grad_accum + m), exactly."""
    args = (f"model.variant={variant}", "run.steps=3", "optim.grad_accum=2")
    plain = train(_cfg(tmp_path / "plain", *args))
    carried = train(_cfg(tmp_path / "carried", *args, "run.carry_state=true"))
    assert carried.train_losses == plain.train_losses == _by_hand(_cfg(tmp_path, *args))[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_carried_windows_equal_the_whole_document(variant):
    """A document read as 3 windows with the trainer's carried (detached) state gives the logits of one forward
    over the document (float64; windows of 7 tokens split the attention window, MAC's segments and the memory's
    chunks at different places)."""
    torch.manual_seed(0)
    cfg = MnemosConfig.from_dict(dict(variant=variant, vocab_size=64, d_model=16, n_layers=2, n_heads=2, window=5,
                                      segment_len=6, num_persistent=2, init_std=0.5,
                                      memory=dict(depth=2, expansion=2, chunk_size=4)))
    model = MnemosLM(cfg).double().eval()
    doc = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _ = model(doc)
        state, parts = None, []
        for w in range(3):
            logits, state = carried_forward(model, model, doc[:, 7 * w : 7 * (w + 1)], state)
            parts.append(logits)
        fresh, _ = model(doc[:, 14:])
    err = (torch.cat(parts, 1) - whole).abs().max().item()
    assert err < 1e-9, f"{variant}: carried windows differ from the whole document by {err:.3e}"
    assert (fresh - whole[:, 14:]).abs().max() > 1e-6  # the last window does depend on the carried state


def test_gradient_spans_one_window(tmp_path):
    """Four steps over documents of two windows (two micro-batches) equal the hand-made version: a step trains on
    its window from the state after the window before, computed with the weights of the step before and detached;
    the loss of a window without queries is 0. The weights at the end are the trainer's exactly."""
    cfg = _cfg(tmp_path, "run.steps=4", "run.carry_state=true", "task.doc_windows=2", "optim.grad_accum=2")
    r = train(cfg)
    losses, model, (fresh_loss, carried_loss) = _by_hand(cfg)
    assert r.train_losses == losses
    trained = MnemosLM(cfg.model)
    load_model_weights(tmp_path / "checkpoint", trained)
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the last window read from a fresh state gives another loss: the comparison above sees the carried state
    assert abs(fresh_loss - carried_loss) > 1e-3


@pytest.mark.parametrize("carry", ["true", "false"])
def test_a_window_without_labels_is_read_not_trained(tmp_path, carry):
    """Documents whose first window holds only the pairs (8 tokens, 4 pairs): the steps on it make no update (the
    weights and AdamW's moments stay as they were: no phantom step from the moments of the step before) and the
    trainer equals the hand-made version, which reads such a window on without a graph (with the state carried) or
    not at all (without)."""
    args = ("run.steps=4", f"run.carry_state={carry}", "task.doc_windows=2", "task.seq_len=8", "optim.grad_accum=2")
    cfg = _cfg(tmp_path, *args)
    data = TaskData(cfg)
    for index in range(4):  # the premise: window 1 of every document is label-free, window 2 is not
        labels = data.batch(index, 2, cfg.run.seed)[1]
        assert (labels[:, :8] == IGNORE_INDEX).all() and (labels[:, 8:] != IGNORE_INDEX).any()
    r = train(cfg)
    losses, model, _ = _by_hand(cfg)
    assert r.train_losses == losses and losses[0] == losses[2] == 0.0 and losses[1] > 0 and losses[3] > 0
    trained = MnemosLM(cfg.model)
    load_model_weights(tmp_path / "checkpoint", trained)
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # step 3 (window 1 of the second documents) left the weights of step 2 as they were
    after2, after3 = MnemosLM(cfg.model), MnemosLM(cfg.model)
    train(_cfg(tmp_path / "two", *args[1:], "run.steps=2"))
    train(_cfg(tmp_path / "three", *args[1:], "run.steps=3"))
    load_model_weights(tmp_path / "two" / "checkpoint", after2)
    load_model_weights(tmp_path / "three" / "checkpoint", after3)
    for (name, a), b in zip(after2.state_dict().items(), after3.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_through_carried_windows_is_the_whole_documents(variant):
    """The state carried with its gradient (``carried_forward(detach=False)``) over 3 windows: the gradient of the
    windows' loss is the whole document's, for every parameter (float64; the memory's writes in window 1 get the
    gradient of the reads in windows 2 and 3). Detached, the gradient differs."""
    torch.manual_seed(0)
    cfg = MnemosConfig.from_dict(dict(variant=variant, vocab_size=64, d_model=16, n_layers=2, n_heads=2, window=5,
                                      segment_len=6, num_persistent=2, init_std=0.5,
                                      memory=dict(depth=2, expansion=2, chunk_size=4)))
    model = MnemosLM(cfg).double()
    doc = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(2))

    def grads(detach: bool | None) -> list[torch.Tensor]:
        model.zero_grad()
        if detach is None:
            logits, _ = model(doc)
        else:
            state, parts = None, []
            for w in range(3):
                out, state = carried_forward(model, model, doc[:, 7 * w : 7 * (w + 1)], state, detach=detach)
                parts.append(out)
            logits = torch.cat(parts, 1)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    whole, spanned, cut = grads(None), grads(False), grads(True)
    err = max((a - b).abs().max().item() for a, b in zip(whole, spanned, strict=True))
    scale = max(a.abs().max().item() for a in whole)
    assert err < 1e-9 * max(scale, 1.0), f"{variant}: gradient through the carried state differs by {err:.3e}"
    assert max((a - b).abs().max().item() for a, b in zip(whole, cut, strict=True)) > 1e-8


def test_gradient_spans_k_windows(tmp_path):
    """``run.carry_grad_windows=2`` over documents of 4 windows (two micro-batches): each step reads two windows,
    the state carried between them with its gradient and detached between steps; the trainer's losses and weights
    are the hand-made version's exactly, and resuming in the middle of a document is bit-exact."""
    args = ("run.steps=4", "run.carry_state=true", "task.doc_windows=4", "run.carry_grad_windows=2",
            "optim.grad_accum=2")
    cfg = _cfg(tmp_path / "full", *args)
    r = train(cfg)
    losses, model, _ = _by_hand(cfg)
    assert r.train_losses == losses
    trained = MnemosLM(cfg.model)
    load_model_weights(tmp_path / "full" / "checkpoint", trained)
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # a span of one window trains other weights: the span is real
    assert _by_hand(_cfg(tmp_path, *args[:-2], "optim.grad_accum=2", "run.steps=8"))[0][1::2] != losses
    first = train(_cfg(tmp_path / "cut", *args, "run.stop_after=1"))  # the middle of the first documents
    rest = train(_cfg(tmp_path / "cut", *args), resume=True)
    assert first.train_losses + rest.train_losses == r.train_losses


def test_gradient_over_the_whole_document_is_training_on_it(tmp_path):
    """A gradient span of all of a document's windows (``run.carry_grad_windows = task.doc_windows``) is training on
    the whole document in one window: the same data (the MQAR example of seq_len * doc_windows tokens), the loss over
    the same positions, the same update; equal up to float32 rounding (the windows' forward rounds differently)."""
    spanned = train(_cfg(tmp_path / "a", "run.steps=4", "run.carry_state=true", "task.doc_windows=2",
                         "run.carry_grad_windows=2"))
    whole = train(_cfg(tmp_path / "b", "run.steps=4", "task.seq_len=32"))
    assert spanned.train_losses == pytest.approx(whole.train_losses, rel=1e-4)
    a, b = MnemosLM(_cfg(tmp_path / "a").model), MnemosLM(_cfg(tmp_path / "a").model)
    load_model_weights(tmp_path / "a" / "checkpoint", a)
    load_model_weights(tmp_path / "b" / "checkpoint", b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), name
    detached = train(_cfg(tmp_path / "c", "run.steps=4", "run.carry_state=true", "task.doc_windows=2"))
    assert detached.train_losses[1] != pytest.approx(whole.train_losses[1], rel=1e-3)


@pytest.mark.parametrize("variant", ["lmm", "mag"])
def test_resume_mid_document_is_bit_exact(tmp_path, variant):
    """Stopped after 4 steps of documents of 3 windows (in the middle of the second document) and resumed: the losses
    of the uninterrupted run, exactly; the carried state travels in the checkpoint."""
    args = (f"model.variant={variant}", "run.steps=6", "run.carry_state=true", "task.doc_windows=3",
            "optim.grad_accum=2")
    full = train(_cfg(tmp_path / "full", *args))
    first = train(_cfg(tmp_path / "cut", *args, "run.stop_after=4"))
    assert first.train_losses == full.train_losses[:4]
    rest = train(_cfg(tmp_path / "cut", *args), resume=True)
    assert rest.train_losses == full.train_losses[4:]


def test_resume_from_a_save_before_any_update_is_bit_exact(tmp_path):
    """Passkey documents of 3 windows hold their answer in the last: steps 1-2 update nothing. A run stopped (and
    saved) after step 1, before any update, resumes to the uninterrupted run's losses exactly. Saving used to give the
    optimizer a state there (torch.distributed.checkpoint's zero-gradient step at lr 0: AdamW's step count 1), which
    shifted every later update's bias correction in both runs and on resume."""
    args = ("task.kind=niah", "task.niah_kind=passkey", "model.vocab_size=259", "task.seq_len=100",
            "task.doc_windows=3", "run.carry_state=true", "run.steps=6")
    full = train(_cfg(tmp_path / "full", *args))
    assert full.train_losses[:2] == [0.0, 0.0]  # the premise: nothing labelled in the first two windows
    first = train(_cfg(tmp_path / "cut", *args, "run.stop_after=1"))
    rest = train(_cfg(tmp_path / "cut", *args), resume=True)
    assert first.train_losses + rest.train_losses == full.train_losses


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="run.carry_state=true does not support run.compile"):
        _cfg(tmp_path, "run.carry_state=true", "run.compile=true")
    with pytest.raises(ValueError, match="task.doc_windows must be >= 1"):
        _cfg(tmp_path, "task.doc_windows=0")
    with pytest.raises(ValueError, match="run.carry_grad_windows=2 spans the carried state"):
        _cfg(tmp_path, "task.doc_windows=2", "run.carry_grad_windows=2")
    with pytest.raises(ValueError, match=r"run.carry_grad_windows \(2\) must divide task.doc_windows \(3\)"):
        _cfg(tmp_path, "task.doc_windows=3", "run.carry_state=true", "run.carry_grad_windows=2")
    with pytest.raises(ValueError, match="run.carry_grad_windows must be >= 1"):
        _cfg(tmp_path, "run.carry_grad_windows=0")
    with pytest.raises(TypeError, match="run.carry_state"):
        _cfg(tmp_path, "run.carry_state=maybe")
    with pytest.raises(ValueError, match=r"task.vocab_size > task.seq_len \* task.doc_windows"):
        _cfg(tmp_path, "task.noise=zoology", "task.doc_windows=4")
    # a checkpoint saved mid-document without a carried state cannot continue the documents with one
    args = ("run.steps=4", "task.doc_windows=2")
    train(_cfg(tmp_path / "a", *args, "run.stop_after=1"))
    with pytest.raises(ValueError, match="middle of a document but holds no carried state"):
        train(_cfg(tmp_path / "a", *args, "run.carry_state=true"), resume=True)


def test_documents_of_every_task_kind(tmp_path):
    """task.doc_windows documents: LM spans of consecutive corpus tokens (labels the next tokens), niah examples of
    the whole document length with the answer in the last window; both train with the state carried."""
    lm = _cfg(tmp_path, "task.kind=lm", "model.vocab_size=259", "task.seq_len=8", "task.doc_windows=3")
    x, y = TaskData(lm).batch(0, 2, seed=0)
    assert x.shape == y.shape == (2, 24) and torch.equal(x[:, 1:], y[:, :-1])
    niah = _cfg(tmp_path, "task.kind=niah", "model.vocab_size=259", "task.seq_len=150", "task.doc_windows=2",
                "task.train_examples=8", "task.eval_examples=2")
    x, y = TaskData(niah).batch(0, 2, seed=0)
    labelled = (y != -100).nonzero()[:, 1]
    assert x.shape == (2, 300) and len(labelled) and labelled.min() >= 150
    for cfg in (lm, niah):
        cfg.run.steps, cfg.run.carry_state = 2, True
        r = train(cfg)
        assert len(r.train_losses) == 2 and all(map(math.isfinite, r.train_losses))
        assert r.train_losses[0] > 0 or cfg.task.kind == "niah"  # niah's first window holds no answer: loss 0


def test_validation_scores_each_window_of_a_document(tmp_path):
    """With documents of 3 windows the val metrics hold each window's accuracy over its own queries, recomputed here
    from the whole-document logits; their query-weighted mean is the overall accuracy."""
    import contextlib

    from mnemos.train.distributed import DistInfo
    from mnemos.train.loop import validate

    cfg = _cfg(tmp_path, "task.doc_windows=3", "task.eval_examples=24")
    torch.manual_seed(0)
    model = MnemosLM(cfg.model)
    data = TaskData(cfg)
    m = validate(model, data, cfg, DistInfo(0, 1, 0, torch.device("cpu")), contextlib.nullcontext)
    inputs, labels = data.val
    with torch.no_grad():
        pred = model(inputs)[0].argmax(-1)
    T, total = cfg.task.seq_len, 0
    for w in range(3):
        y, p = labels[:, w * T : (w + 1) * T], pred[:, w * T : (w + 1) * T]
        n = int((y != -100).sum())
        assert m[f"val_window{w + 1}_n"] == n and n > 0
        assert m[f"val_window{w + 1}_accuracy"] == pytest.approx(float((p == y)[y != -100].float().mean()))
        total += m[f"val_window{w + 1}_accuracy"] * n
    assert sum(m[f"val_window{w + 1}_n"] for w in range(3)) == m["val_n"]
    assert total / m["val_n"] == pytest.approx(m["val_accuracy"])
    assert "val_window4_accuracy" not in m
    one = validate(model, TaskData(_cfg(tmp_path)), _cfg(tmp_path), DistInfo(0, 1, 0, torch.device("cpu")),
                   contextlib.nullcontext)
    assert not any(k.startswith("val_window") for k in one)


def test_init_from_starts_from_a_checkpoints_weights(tmp_path):
    """run.init_from: the weights of a saved run, a fresh optimizer and step count (fine-tuning); a model config the
    checkpoint does not fit, or no checkpoint, is an error naming the key."""
    train(_cfg(tmp_path / "a", "run.steps=3"))
    tuned = _cfg(tmp_path / "b", "run.steps=1", f"run.init_from={tmp_path / 'a'}", "optim.lr=1e-12",
                 "optim.weight_decay=0", "optim.warmup_steps=0")
    result = train(tuned)
    assert len(result.train_losses) == 1  # its own step count, from step 0
    models = []
    for run in ("a", "b"):
        m = MnemosLM(tuned.model)
        load_model_weights(tmp_path / run / "checkpoint", m)
        models.append(m.state_dict())
    for name, w in models[0].items():
        assert torch.allclose(w, models[1][name], atol=1e-9), name  # lr 1e-12: b ends where it started, at a
    assert not torch.allclose(MnemosLM(tuned.model).state_dict()["embed.weight"], models[0]["embed.weight"])
    with pytest.raises(ValueError, match=r"run\.init_from: .*model\.d_model"):
        train(_cfg(tmp_path / "c", "model.d_model=16", f"run.init_from={tmp_path / 'a' / 'checkpoint'}"))
    with pytest.raises(ValueError, match=r"run\.init_from: no checkpoint"):
        train(_cfg(tmp_path / "d", f"run.init_from={tmp_path / 'nowhere'}"))
