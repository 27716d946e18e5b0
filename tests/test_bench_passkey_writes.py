"""benchmarks/passkey_writes.py: the per-token write and forget gates it reports are the layers' own, per layer in
module order, for the prompt's tokens only (lmm's persistent prefix dropped), and the model is left as it was."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import passkey_writes  # noqa: E402

from mnemos.eval.adapters import MnemosLMAdapter  # noqa: E402
from mnemos.layers import NeuralMemory  # noqa: E402
from mnemos.models import MnemosConfig, MnemosLM  # noqa: E402


def _adapter(variant="lmm", **memory):
    torch.manual_seed(0)
    cfg = MnemosConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, variant=variant, num_persistent=3,
                       memory={"chunk_size": 2, **memory})
    return MnemosLMAdapter(MnemosLM(cfg).eval(), name=variant)


def test_the_traces_are_the_layers_own_gates_on_the_prompt_tokens():
    adapter = _adapter(write_floor=0.4)
    memories = [m for m in adapter.model.modules() if isinstance(m, NeuralMemory)]
    with torch.no_grad():
        for m in memories:  # spread the gates, so that some pairs sit below the floor
            m.to_gates.weight.mul_(50)
    ids = torch.randint(0, 32, (1, 11))
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, inputs=inputs: inputs.append(args[0])) for m in memories]
    traces = passkey_writes.gate_traces(adapter, ids)
    for h in hooks:
        h.remove()
    assert len(traces) == len(memories) == 2
    for m, (theta, alpha) in zip(memories, traces, strict=True):
        assert theta.shape == alpha.shape == (11, 2)
    # the layers saw the persistent prefix first; the traces are the last 11 tokens' gates, recomputed here
    seen = [x for x in inputs if x.shape[1] >= 11]
    for m, x, (theta, alpha) in zip(memories, seen[-2:], traces, strict=True):
        with torch.no_grad():
            _, _, _, th, _, al, *_ = m._project(x, None)
        torch.testing.assert_close(theta, (th / m.token_lr)[0, -11:])
        torch.testing.assert_close(alpha, al[0, -11:])
    assert any((t == 0).any() and (t > 0).any() for t, _ in traces)  # the floor closes some pairs, not all
    assert all("_project" not in vars(m) for m in memories)  # the wrapper is gone: the model is as it was


def test_a_model_without_a_memory_is_refused_by_name():
    with pytest.raises(ValueError, match="transformer has no neural memory"):
        passkey_writes.gate_traces(_adapter("transformer"), torch.zeros(1, 4, dtype=torch.long))


def test_the_cli_splits_the_rest_into_before_and_after_the_needle(tmp_path, capsys):
    """The JSON's per-prompt rows: writes after the needle are a part of the rest, counted per head, and equal to the
    traces' own count past the needle's end."""
    from mnemos.data.niah import NIAHConfig
    from mnemos.train.checkpoint import save_checkpoint

    # _adapter's model on the passkey prompts' byte-level vocabulary, its gates spread so the floor closes some pairs
    cfg = {**_adapter(write_floor=0.4).model.config.to_dict(), "vocab_size": 259}
    torch.manual_seed(0)
    model = MnemosLM(MnemosConfig.from_dict(cfg)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NeuralMemory):
                m.to_gates.weight.mul_(50)
    save_checkpoint(tmp_path / "ck", model, step=0, config={"model": cfg})
    out = tmp_path / "w.json"
    assert passkey_writes.main(["--model", str(tmp_path / "ck"), "--length", "512", "--depths", "0.5",
                                "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2  # one prompt, two memory layers
    s = NIAHConfig(kind="passkey", lengths=(512,), depths=(0.5,), samples_per_cell=1).build(7777)[0]
    end = s.needle_start + len(s.needle.encode())
    traces = passkey_writes.gate_traces(MnemosLMAdapter(model, name="lmm"), s.input_ids.unsqueeze(0))
    for row, (theta, _) in zip(rows, traces, strict=True):
        assert row["after_needle_written"] == int((theta[end:] > 0).sum())
        assert sum(row["after_needle_written_per_head"]) == row["after_needle_written"] <= row["rest_written"]
    assert any(0 < r["after_needle_written"] < r["rest_written"] for r in rows)  # writes on both sides of it
    assert "after the needle; by head" in capsys.readouterr().out
