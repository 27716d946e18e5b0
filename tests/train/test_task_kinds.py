"""The trainer's retrieval tasks (task.kind niah and babilong): prompts from mnemos.data with the answer appended,
labels on the answer tokens only, batches a pure function of (seed, step), the teacher-forced exact-match metric,
and the configuration errors."""

from __future__ import annotations

import json

import pytest
import torch

from mnemos.data import IGNORE_INDEX, ByteTokenizer
from mnemos.train.config import answer_task_min_len, load_config
from mnemos.train.loop import TaskData, answer_accuracy, answer_example, train

BYTES = ByteTokenizer()
TINY = ["model.variant=gated_deltanet", "model.vocab_size=259", "model.d_model=16", "model.n_layers=1",
        "model.n_heads=2", "task.train_examples=64", "task.eval_examples=6", "run.batch_size=3", "run.progress=false",
        "optim.warmup_steps=1"]
PASSKEY = ["task.kind=niah", "task.niah_kind=passkey", "task.seq_len=300"]


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


@pytest.mark.parametrize("task", [PASSKEY, ["task.kind=niah", "task.niah_kind=number", "task.seq_len=430"],
                                  ["task.kind=babilong", "task.babilong_qa=qa2", "task.seq_len=600"]])
def test_labels_only_on_the_answer(task):
    cfg = _cfg(*task)
    inputs, labels = TaskData(cfg).batch(step=5, size=3, seed=0)
    assert inputs.shape == labels.shape == (3, cfg.task.seq_len)
    for x, y in zip(inputs, labels, strict=True):
        at = (y != IGNORE_INDEX).nonzero().flatten()
        assert (at == torch.arange(at[0], at[-1] + 1)).all()  # one contiguous span
        answer = BYTES.decode(y[at].tolist())
        assert answer.startswith(" ") and answer.endswith(".") and " " not in answer[1:]
        # the labels are the next tokens of the sequence: the answer follows the prompt's question
        prompt = BYTES.decode(x[: at[0] + 1].tolist())
        assert prompt.endswith(("The pass key is", "provided text is", "Answer:"))
        assert (x[at[1:]] == y[at[:-1]]).all()
        if cfg.task.kind == "niah":  # the needle in the prompt holds the answer
            assert answer[1:-1] in prompt


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = TaskData(_cfg(*PASSKEY)), TaskData(_cfg(*PASSKEY))
    x1, y1 = a.batch(7, 4, seed=3)
    a.batch(8, 4, seed=3)
    x2, y2 = b.batch(7, 4, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = a.batch(9, 4, seed=3)
    assert not torch.equal(x1, x3)
    x4, _ = a.batch(7, 4, seed=4)
    assert not torch.equal(x1, x4)
    # val examples come from another stream than the training examples
    val_x, _ = a.val
    train_x = torch.stack([answer_example(a.task, 0, i)[0] for i in range(64)])
    assert not any(torch.equal(v, t) for v in val_x for t in train_x)


def test_answer_accuracy_is_exact_match_of_every_answer_token():
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[:, 3:5] = torch.tensor([[1, 2], [1, 2], [1, 2]])
    pred = torch.zeros(3, 6, dtype=torch.long)
    pred[0, 3:5] = torch.tensor([1, 2])  # right
    pred[1, 3:5] = torch.tensor([1, 9])  # one token wrong
    pred[2, 3:5] = torch.tensor([1, 2])
    pred[2, 0] = 7  # a wrong token off the answer does not count
    m = answer_accuracy(pred, labels)
    assert m["val_accuracy"] == pytest.approx(2 / 3) and m["val_token_accuracy"] == pytest.approx(5 / 6)


def test_a_tiny_model_trains_and_logs_the_val_metric(tmp_path):
    r = train(_cfg(*PASSKEY, "run.steps=2", "run.eval_every=2", f"run.out_dir={tmp_path}"))
    assert set(r.final_eval) >= {"val_loss", "val_accuracy", "val_token_accuracy", "val_examples"}
    assert 0 <= r.final_eval["val_accuracy"] <= 1 and r.final_eval["val_examples"] == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(row["split"] == "val" and "val_token_accuracy" in row for row in rows)


def test_errors():
    with pytest.raises(ValueError, match="byte tokenizer .* model.vocab_size must be >= 259"):
        load_config(None, [*PASSKEY, "model.vocab_size=128"])
    minimum = answer_task_min_len(_cfg(*PASSKEY).task)
    with pytest.raises(ValueError, match=f"task.seq_len must be >= {minimum} for task.kind=niah"):
        _cfg("task.kind=niah", f"task.seq_len={minimum - 1}")
    _cfg("task.kind=niah", f"task.seq_len={minimum}")  # the shortest that fits
    with pytest.raises(ValueError, match=r"task.seq_len must be >= \d+ .*\(babilong_qa=qa3"):
        _cfg("task.kind=babilong", "task.babilong_qa=qa3", "task.seq_len=600")
    with pytest.raises(ValueError, match="task.niah_kind must be one of"):
        _cfg("task.kind=niah", "task.niah_kind=uuid", "task.seq_len=600")
    with pytest.raises(ValueError, match="task.kind must be one of"):
        _cfg("task.kind=passkey")


def test_the_shortest_sequence_fits_the_longest_answer():
    for task in (["task.kind=niah", "task.niah_kind=number"], ["task.kind=babilong", "task.babilong_qa=qa1"]):
        minimum = answer_task_min_len(_cfg(*task, "task.seq_len=2000").task)
        data = TaskData(_cfg(*task, f"task.seq_len={minimum}"))
        x, y = data.batch(0, 4, seed=1)
        assert x.shape == (4, minimum) and ((y != IGNORE_INDEX).sum(-1) >= 3).all()
