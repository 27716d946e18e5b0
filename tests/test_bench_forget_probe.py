"""benchmarks/forget_gate_probe.py: the shifted copies lower every memory's forgetting gate and nothing else."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import forget_gate_probe  # noqa: E402

from mnemos.eval.adapters import MnemosLMAdapter  # noqa: E402
from mnemos.models import MnemosConfig, MnemosLM  # noqa: E402


def test_shift_lowers_alpha_only():
    torch.manual_seed(0)
    base = MnemosLMAdapter(MnemosLM(MnemosConfig(variant="mag", vocab_size=32, d_model=16, n_layers=2, n_heads=2)))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    probe = forget_gate_probe.shifted(base, 5.0)
    after = probe.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["blocks.0.mixer.memory.to_gates.bias", "blocks.1.mixer.memory.to_gates.bias"]
    for k in changed:  # the alpha rows (the last H), lowered by exactly the shift; theta's and eta's untouched
        assert torch.equal(after[k][-2:], before[k][-2:] - 5.0) and torch.equal(after[k][:-2], before[k][:-2])
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in before.items())  # the original is unchanged
    x = torch.randint(0, 32, (1, 9))
    with torch.no_grad():  # the shifted memory forgets less, so it reads differently
        assert not torch.allclose(base.model(x)[0], probe.model(x)[0])


def test_a_model_without_memory_is_refused():
    base = MnemosLMAdapter(MnemosLM(MnemosConfig(variant="swa", vocab_size=32, d_model=16, n_layers=1, n_heads=2)))
    with pytest.raises(ValueError, match="no neural memory"):
        forget_gate_probe.shifted(base, 5.0)


def test_mqar_mode_scores_every_model_at_every_length(monkeypatch, capsys):
    """``--task mqar``: the model as trained and each shifted copy on MQAR at every ``--lengths`` (K fixed), one cell
    each, with the near / far split at ``--reach``."""
    torch.manual_seed(0)
    base = MnemosLMAdapter(MnemosLM(MnemosConfig(variant="lmm", vocab_size=32, d_model=16, n_layers=1, n_heads=2)),
                           name="tiny")
    monkeypatch.setattr(forget_gate_probe, "load_mnemos_checkpoint", lambda path, device=None: base)
    assert forget_gate_probe.main(["--task", "mqar", "--model", "unused", "--shifts", "5", "--lengths", "16", "24",
                                   "--kv-pairs", "2", "--vocab", "32", "--samples", "4", "--reach", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 4, lines  # 2 models x 2 lengths
    assert sum(line.startswith("tiny, forget bias -5 ") for line in lines) == 2
    assert {"'seq_len': 16" in line for line in lines} == {True, False}


def test_stopped_writes_leave_earlier_outputs_and_change_later_ones():
    """``writes_stopped(after)``: theta is 0 from the sequence's token ``after`` on, counted from each ``init_state``
    over a stream's calls (lmm's persistent prefix, written there, not counted): a stream cut anywhere matches one
    call, every output before the stop is the model's own, the later ones read a memory they no longer write, and a
    second stream (a new batch of the harness) stops at the same place."""
    torch.manual_seed(0)
    cfg = MnemosConfig(variant="lmm", vocab_size=32, d_model=16, n_layers=2, n_heads=2, num_persistent=3)
    base = MnemosLMAdapter(MnemosLM(cfg), name="tiny")
    probe = forget_gate_probe.writes_stopped(base, 5)
    x = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        y0 = base.forward(x, base.init_state(2))[0]
        for _ in range(2):  # two streams in a row
            state, parts = probe.init_state(2), []
            for a, b in ((0, 4), (4, 7), (7, 12)):  # the stop (token 5) falls inside the second call
                y, state = probe.forward(x[:, a:b], state)
                parts.append(y)
            y1 = torch.cat(parts, dim=1)
            assert torch.allclose(y0[:, :5], y1[:, :5], atol=1e-6)
            assert not torch.allclose(y0[:, 5:], y1[:, 5:], atol=1e-3)
        assert torch.allclose(probe.forward(x, probe.init_state(2))[0], y1, atol=1e-5)  # one call == the stream
        forget_gate_probe.set_stop(probe, None)
        assert torch.allclose(probe.forward(x, probe.init_state(2))[0], y0, atol=1e-6)  # never stopped: the model
        forget_gate_probe.set_stop(probe, 0)  # never written: the first output already differs
        assert not torch.allclose(probe.forward(x, probe.init_state(2))[0][:, 0], y0[:, 0], atol=1e-3)
    with pytest.raises(ValueError, match="no neural memory"):
        forget_gate_probe.writes_stopped(MnemosLMAdapter(MnemosLM(MnemosConfig(
            variant="swa", vocab_size=32, d_model=16, n_layers=1, n_heads=2))), 3)


def test_passkey_with_writes_stopped_scores_each_prompt():
    """The passkey path streams each prompt alone and scores its greedy answer; an untrained model finds no key."""
    from mnemos.data.niah import NIAHConfig

    torch.manual_seed(0)
    base = MnemosLMAdapter(MnemosLM(MnemosConfig(variant="lmm", vocab_size=259, d_model=16, n_layers=1, n_heads=2)))
    samples = NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=2).build(0)
    probe = forget_gate_probe.writes_stopped(base, None)
    assert forget_gate_probe.passkey_with_writes_stopped(probe, samples, stream_chunk=100) == 0.0
