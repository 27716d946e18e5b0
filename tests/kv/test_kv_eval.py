"""KV policies in the evaluation harness (``mnemos eval --kv-policy``; docs/KV.md, docs/BENCHMARKS.md).

- the spec grammar: sweeps, units, canonical text; bad specs are one-line errors naming the flag;
- every cell records its policy, and ``state_bytes`` / ``kv_cache_bytes`` are the bytes the caches hold (an
  independent replay's ``nbytes``, and the hand count), falling as the budget falls; models without a KV cache run
  once, as they are;
- shared context, many queries: with a state that loses nothing, turn k's answer equals a fresh prefill of the same
  prompt and the one-call teacher-forced answer (mnemos attention, LMM, a Hugging Face Llama); with a compressing
  policy turn 1 is still the fresh answer and later turns read the compressed cache;
- the report: accuracy against state bytes (table and figure) and accuracy by turn.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from kv_helpers import V, attn_caches, make_model, tiny_llama

from mnemos.cli import main
from mnemos.data import MQARConfig
from mnemos.eval import EvalOptions, MnemosLMAdapter, evaluate
from mnemos.eval.harness import KVPolicyLM, with_kv_policies
from mnemos.eval.plots import policy_family
from mnemos.eval.report import write_report
from mnemos.eval.tables import pool
from mnemos.kv import H2O, Bytes, L2Norm, SnapKV, StreamingLLM
from mnemos.kv.spec import parse_policy_spec

MQ = MQARConfig(vocab_size=V, seq_len=32, num_kv_pairs=4, num_examples=6)


def _opts(**kw) -> EvalOptions:
    return EvalOptions(progress=False, raise_errors=True, **kw)


def _adapter(variant: str = "transformer") -> MnemosLMAdapter:
    return MnemosLMAdapter(make_model(variant), name=variant)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


# ----------------------------------------------------------------------------------------------------------------------


def test_spec_grammar_sweeps_units_and_canonical_text():
    specs = parse_policy_spec("snapkv:budget=64,128,window_size=4")
    assert [s.text for s in specs] == ["snapkv:budget=64,window_size=4", "snapkv:budget=128,window_size=4"]
    assert all(isinstance(s.policy, SnapKV) and s.policy.window_size == 4 for s in specs)
    assert [s.policy.budget for s in specs] == [64, 128]
    grid = parse_policy_spec("streamingllm:budget=8,16,sinks=1,2")
    assert [(s.policy.budget, s.policy.sinks) for s in grid] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    (b,) = parse_policy_spec("H2O:budget=4KiB,recent=0.25")
    assert isinstance(b.policy, H2O) and b.policy.budget == Bytes(4096) and isinstance(b.policy.budget, Bytes)
    assert b.text == "h2o:budget=4KiB,recent=0.25" and b.name == "h2o"
    (l2,) = parse_policy_spec("l2norm:budget=0.5,skip_layers=0;1")
    assert isinstance(l2.policy, L2Norm) and l2.policy.skip_layers == (0, 1) and l2.policy.budget == 0.5
    assert parse_policy_spec("none")[0].policy is None and parse_policy_spec("full")[0].text == "none"
    for bad, words in [("snapkv:budget=0", "budget"), ("foo:budget=3", "unknown policy 'foo'"),
                       ("snapkv:bduget=3", "no parameter 'bduget'"), ("snapkv:256", "has no name"),
                       ("kivi:bits=3", "bits"), ("snapkv:budget=8,budget=9", "repeated"),
                       ("streamingllm:budget=4,sinks=4", "sinks")]:
        with pytest.raises(ValueError, match=words):
            parse_policy_spec(bad)


def test_a_bad_spec_is_a_one_line_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "mqar", "--model", "baseline:random", "--kv-policy", "snapkv:budget=0", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --kv-policy" in err and "budget" in err, err


def test_cells_record_the_policy_and_the_bytes_the_caches_hold():
    models = _quiet(with_kv_policies, [_adapter("transformer"), _adapter("lmm")],
                    ["streamingllm:budget=6,12,sinks=1", "none"])
    assert [m.name for m in models] == ["transformer + streamingllm:budget=6,sinks=1",
                                        "transformer + streamingllm:budget=12,sinks=1", "transformer", "lmm"]
    assert isinstance(models[0], KVPolicyLM) and models[0].state_growth == "constant"
    res = evaluate(models, MQ, options=_opts(stream_chunk=8))
    cells = {c.model_name: c for c in res.cells}
    # 2 layers x 4 kv heads x (16 x 8 B of keys and values + a 4 B position) = 1056 B per kept token and sequence
    for budget in (6, 12):
        c = cells[f"transformer + streamingllm:budget={budget},sinks=1"]
        assert c.model["kv_policy"] == f"streamingllm:budget={budget},sinks=1"
        assert c.model["base_model"] == "transformer" and c.model["kv_policy_name"] == "streamingllm"
        assert c.metrics["state_bytes"] == c.metrics["kv_cache_bytes"] == budget * 1056
    full = cells["transformer"]
    assert full.model["kv_policy"] is None
    assert full.metrics["kv_cache_bytes"] == full.metrics["state_bytes"] == 32 * 1024
    assert cells["lmm"].model["kv_policy"] is None and "kv_cache_bytes" not in cells["lmm"].metrics
    # an independent replay: the same batch streamed by hand, the caches' own nbytes
    model = models[0].base.model
    inputs, _ = MQ.build(0)
    with StreamingLLM(6, sinks=1)(model):
        cache = model.init_cache(6)
    with torch.no_grad():
        for s in range(0, 32, 8):
            _, cache = model(inputs[:, s : s + 8], cache)
    assert sum(kv.nbytes for kv in attn_caches(cache)) // 6 == 6 * 1056


def test_models_without_a_kv_cache_run_as_they_are_and_bad_fits_are_errors():
    with pytest.warns(UserWarning, match="lmm has no KV cache"):
        out = with_kv_policies([_adapter("lmm")] * 1 + [_adapter("transformer")], ["h2o:budget=8"])
    assert [m.name for m in out] == ["lmm", "transformer + h2o:budget=8"]
    with pytest.raises(ValueError, match="--kv-policy: none of the models"):
        _quiet(with_kv_policies, [_adapter("lmm")], ["h2o:budget=8"])
    with pytest.raises(ValueError, match="--kv-policy kivi:group_size=32 on transformer: group_size"):
        with_kv_policies([_adapter("transformer")], ["kivi:group_size=32"])  # head dim 8


# ----------------------------------------------------------------------------------------------------------------------


def _one_call_predictions(model, cfg: MQARConfig) -> list[list[int]]:
    """Teacher-forced argmax at each sequence's query positions, the whole sequence in one call, no policy."""
    inputs, labels = cfg.build(0)
    with torch.no_grad():
        logits, _ = model(inputs, model.init_cache(inputs.shape[0]))
    return [logits[n, (labels[n] != -100).nonzero().flatten()].argmax(-1).tolist() for n in range(inputs.shape[0])]


def _turn_predictions(res, name: str, mode: str) -> list[list[int]]:
    (cell,) = [c for c in res.cells if c.model_name == name and c.params.get("mode") == mode]
    assert cell.metrics["n"] == len(cell.samples) * 4 and len(cell.metrics["turn_n"]) == 4
    return [s["predictions"] for s in cell.samples]


@pytest.mark.parametrize("variant", ["transformer", "lmm"])
def test_shared_context_without_compression_equals_a_fresh_prefill(variant):
    base = _adapter(variant)
    specs = ["none", "h2o:budget=64"] if variant == "transformer" else ["none"]
    models = with_kv_policies([base], specs)
    res = evaluate(models, MQ, options=_opts(mqar_turns=("shared", "fresh"), stream_chunk=5))
    want = _one_call_predictions(base.model, MQ)
    for m in models:
        shared, fresh = _turn_predictions(res, m.name, "shared"), _turn_predictions(res, m.name, "fresh")
        assert shared == fresh == want, f"{m.name}: turn answers differ from a fresh prefill of the same prompt"
        one_call = [c for c in res.cells if c.model_name == m.name and "mode" not in c.params][0]
        by_turn = [c for c in res.cells if c.model_name == m.name and c.params.get("mode") == "shared"][0]
        assert by_turn.metrics["correct"] == one_call.metrics["correct"]


def test_shared_context_with_compression_reuses_the_compressed_cache():
    base = _adapter("transformer")
    (m,) = with_kv_policies([base], ["streamingllm:budget=4,sinks=1"])
    res = evaluate([m], MQ, options=_opts(mqar_turns=("shared", "fresh")))
    shared, fresh = _turn_predictions(res, m.name, "shared"), _turn_predictions(res, m.name, "fresh")
    want = _one_call_predictions(base.model, MQ)
    # turn 1 is answered by the prefill itself (attend, then compress), and a fresh one-call prefill sees everything
    assert [s[0] for s in shared] == [w[0] for w in want] and fresh == want
    # later turns: a hand replay that carries a 4-entry StreamingLLM cache from turn to turn gives the same answers,
    # from logits that differ from the full cache's
    model = base.model
    inputs, labels = MQ.build(0)
    moved = 0.0
    for n in range(MQ.num_examples):
        qpos = (labels[n] != -100).nonzero().flatten().tolist()
        with StreamingLLM(4, sinks=1)(model):
            cache = model.init_cache(1)
        full = model.init_cache(1)
        preds, start = [], 0
        with torch.no_grad():
            for q in qpos:
                logits, cache = model(inputs[n : n + 1, start : q + 1], cache)
                ref, full = model(inputs[n : n + 1, start : q + 1], full)
                preds.append(int(logits[0, -1].argmax()))
                moved = max(moved, (logits[0, -1] - ref[0, -1]).abs().max().item())
                start = q + 1
        assert preds == shared[n], f"sequence {n}: turn answers {shared[n]} != a replay of the compressed cache {preds}"
    assert moved > 1e-3, "the compressed cache must change what later turns read"


def test_hugging_face_llama_with_a_policy_in_the_harness():
    pytest.importorskip("transformers")  # the optional [hf] extra; installed in CI with [test]
    from mnemos.eval import HFCausalLMAdapter

    base = HFCausalLMAdapter(tiny_llama(V), name="llama")
    models = with_kv_policies([base], ["h2o:budget=64", "streamingllm:budget=8,sinks=2"])
    cfg = MQARConfig(vocab_size=V, seq_len=32, num_kv_pairs=4, num_examples=3)
    res = _quiet(evaluate, models, cfg, options=_opts(mqar_turns=("shared", "fresh"), stream_chunk=8))
    with torch.no_grad():
        inputs, labels = cfg.build(0)
        logits = base.model(inputs).logits
    want = [logits[n, (labels[n] != -100).nonzero().flatten()].argmax(-1).tolist() for n in range(3)]
    lossless = "llama + h2o:budget=64"
    assert _turn_predictions(res, lossless, "shared") == _turn_predictions(res, lossless, "fresh") == want
    for c in res.cells:
        # 2 layers x 2 kv heads x (2 x 8 x 4 B + 4 B position + 4 B score for H2O) per kept token and sequence
        per_token = 2 * 2 * (2 * 8 * 4 + 4 + (4 if "h2o" in c.model_name else 0))
        kept = 32 if "h2o" in c.model_name else 8
        if "mode" not in c.params:
            assert c.metrics["kv_cache_bytes"] == c.metrics["state_bytes"] == kept * per_token, c.model_name


# ----------------------------------------------------------------------------------------------------------------------


def test_report_puts_policies_and_recurrent_states_on_one_bytes_axis(tmp_path):
    models = _quiet(with_kv_policies, [_adapter("transformer"), _adapter("lmm")],
                    ["snapkv:budget=6,12,window_size=2", "none"])
    res = evaluate(models, MQ, options=_opts(stream_chunk=8, mqar_turns=("shared",)))
    fams = {p.model: policy_family(p) for p in pool(res, "mqar") if "mode" not in p.params}
    assert fams["transformer + snapkv:budget=6,window_size=2"] == ("transformer + snapkv:window_size=2", "6")
    assert fams["transformer + snapkv:budget=12,window_size=2"][0] == "transformer + snapkv:window_size=2"
    assert fams["lmm"] == ("lmm", None)
    written = {p.name for p in write_report(res, tmp_path)}
    assert {"accuracy_vs_state_bytes.png", "mqar_turns.png", "report.md"} <= written
    md = (tmp_path / "report.md").read_text()
    assert "## Accuracy against state bytes" in md and "accuracy by turn" in md
    rows = [line for line in md.splitlines() if line.startswith("| mqar |")]
    one_call = [r for r in rows if "mode=" not in r]
    assert len(rows) == 8 and len(one_call) == 4, rows  # the one-call cells and the shared-context ones, apart
    assert "snapkv:budget=6,window_size=2" in one_call[0] and "| lmm |" in one_call[-1], one_call
