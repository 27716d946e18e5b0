"""benchmarks/qk_alignment.py: a memory whose keys are its queries one token back scores every pair's key first in
every head; scrambled keys score at chance; MAC and models without memory are refused; the CLI end to end."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import qk_alignment  # noqa: E402

from mnemos.data.mqar import MQARConfig  # noqa: E402
from mnemos.layers import NeuralMemory  # noqa: E402
from mnemos.models import MnemosConfig, MnemosLM  # noqa: E402

K = 4


def _model(variant="lmm", **kw):
    torch.manual_seed(0)
    return MnemosLM(MnemosConfig(variant=variant, vocab_size=64, d_model=32, n_layers=2, n_heads=2, **kw)).eval()


def _data():
    return MQARConfig(seq_len=32, num_kv_pairs=K, vocab_size=64, num_examples=16).build(3)


def test_exact_successor_keys_rank_first_and_scrambled_ones_at_chance():
    model = _model()
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    with torch.no_grad():  # the successor init without the conv's random part: k_{t+1} == q_t exactly
        for m in memories:
            inner = m.conv.weight.shape[0] // 3
            m.conv.weight.zero_()
            m.conv.weight[:inner, 0, -1] = m.conv.weight[2 * inner:, 0, -1] = m.conv.weight[inner:2 * inner, 0, -2] = 1
    x, y = _data()
    logits, caps = qk_alignment.capture_qk(model, x)
    assert logits.shape == (16, 32, 64) and len(caps) == 2
    assert caps[0][0].shape == (16, 32, 2, 16)  # the LMM's persistent tokens are cut off
    first = qk_alignment.pair_key_ranks_first(*caps[0], x, y, K)
    assert torch.equal(first, torch.ones(2))  # the first layer's input is the token embedding: exact
    # keys of another sequence: no pair's key is the query's any more
    q, k = caps[0]
    scrambled = qk_alignment.pair_key_ranks_first(q, k.roll(1, dims=0), x, y, K)
    assert (scrambled < 0.6).all(), scrambled
    # the hooks are gone: the model computes as before
    again, _ = model(x)
    assert torch.equal(again, logits)
    assert all("_project" not in vars(m) for m in memories)


def test_mac_and_models_without_memory_are_refused():
    x, _ = _data()
    with pytest.raises(ValueError, match="MAC writes and reads per segment"):
        qk_alignment.capture_qk(_model("mac", segment_len=8), x)
    with pytest.raises(ValueError, match="no memory layer"):
        qk_alignment.capture_qk(_model("swa", window=4), x)


def test_cli_prints_each_layer_and_head(tmp_path, capsys):
    from mnemos.train.config import load_config
    from mnemos.train.loop import train

    cfg = load_config(None, ["model.variant=mal", "model.vocab_size=64", "model.d_model=32", "model.n_layers=1",
                             "model.n_heads=2", "model.window=4", "task.vocab_size=64", "task.seq_len=32",
                             f"task.num_kv_pairs={K}", "task.train_examples=64", "task.eval_examples=16",
                             "run.batch_size=8", "run.steps=2", "run.progress=false", f"run.out_dir={tmp_path}"])
    train(cfg)
    assert qk_alignment.main([str(tmp_path), "--examples", "8"]) == 0
    out = capsys.readouterr().out
    assert "chance 0.250" in out and "memory layer 0: head 0 " in out and "head 1 " in out
    lm = json.loads((tmp_path / "config.json").read_text())
    lm["task"] = {**lm["task"], "kind": "lm"}
    lm["model"]["vocab_size"] = 259  # (the byte tokenizer's)
    (tmp_path / "config.json").write_text(json.dumps(lm))
    with pytest.raises(SystemExit, match="this measures MQAR-trained models"):
        qk_alignment.main([str(tmp_path)])
