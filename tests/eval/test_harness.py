"""The evaluation harness: scoring is right (an oracle scores 100%, a context-blind model scores chance), streaming
equals one call, growing states are refused cleanly, and the adapters speak each model family's API."""

import io
import math
import sys

import pytest
import torch
from eval_stubs import (
    AnswerKeyLM,
    ConstantLM,
    FakeHFCausalLM,
    FakeHFTokenizer,
    TinyAttentionLM,
    TinyRecurrentLM,
    spelling_table,
)

from mnemos.data import BABILongConfig, LMDataConfig, MQARConfig, NIAHConfig, PasskeyCapacityConfig
from mnemos.eval import (
    EvalOptions,
    HFCausalLMAdapter,
    InductionLM,
    MnemosLMAdapter,
    StatefulLM,
    evaluate,
    load_model,
    state_size,
)
from mnemos.eval._progress import progress_bar
from mnemos.eval.harness import auto_memory_budget_gb

QUIET = EvalOptions(progress=False)
BYTES = 259


def _opts(**kw) -> EvalOptions:
    return EvalOptions(progress=False, **kw)


def _text_oracle(*configs) -> AnswerKeyLM:
    prompts = {}
    for cfg in configs:
        data = cfg.build(seed=0)
        samples = [s for v in data.values() for s in v] if isinstance(data, dict) else data
        prompts.update({tuple(s.input_ids.tolist()): s.answer for s in samples})
    return AnswerKeyLM(BYTES, prompts=prompts)


# -- scoring ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_oracle_scores_100_on_mqar_whatever_the_chunking(chunk):
    cfg = MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=12)
    inputs, labels = cfg.build(seed=0)
    oracle = AnswerKeyLM(128, mqar=(inputs, labels, 8))
    (cell,) = evaluate(oracle, cfg, options=_opts(stream_chunk=chunk, batch_size=5)).cells
    assert cell.status == "ok" and cell.metrics["n"] == 12 * 8
    assert cell.metrics["accuracy"] == 1.0


def test_mqar_cells_split_by_reach_and_count_context_values():
    """The cell carries mqar_recall_metrics: a model that always answers the sample's first value is right 1/K of
    the time, every answer a context value; "auto" splits every model at its windowed peers' reach."""
    K = 4
    cfg = MQARConfig(vocab_size=128, seq_len=48, num_kv_pairs=K, num_examples=40)

    class FirstValue(StatefulLM):
        name, vocab_size = "first-value", 128

        def init_state(self, batch):
            return None

        def forward(self, ids, state):
            first = ids[:, 1:2] if state is None else state  # the context's first value, carried
            return torch.nn.functional.one_hot(first.expand_as(ids), 128).float(), first

    def windowed(n_layers, window):
        model = TinyRecurrentLM(128, variant="swa")
        model.config.n_layers, model.config.window = n_layers, window
        return MnemosLMAdapter(model, name=f"swa-{n_layers}x{window}")

    (cell,) = evaluate(FirstValue(), cfg, options=_opts(mqar_reach=9, stream_chunk=5)).cells
    m = cell.metrics
    assert m["accuracy"] == pytest.approx(1 / K, abs=0.1) and m["context_value_rate"] == 1.0
    assert m["reach"] == 9 and m["n_near"] + m["n_far"] == m["n"] == 40 * K and m["any_value_level"] == 1 / K
    assert m["far_context_value_rate"] == 1.0 and m["chance"] == 1 / 64
    reach = {c.model["name"]: c.metrics.get("reach") for c in evaluate(
        [FirstValue(), windowed(2, 8)], cfg, options=QUIET).cells}
    assert reach == {"first-value": 14, "swa-2x8": 14}  # one split for the run: the windowed models' reach
    reach = {c.model["name"]: c.metrics.get("reach") for c in evaluate(
        [FirstValue(), windowed(2, 8), windowed(1, 4)], cfg, options=QUIET).cells}
    assert reach == {"first-value": None, "swa-2x8": 14, "swa-1x4": 3}  # they disagree: each its own
    assert "near_accuracy" not in evaluate(windowed(2, 8), cfg, options=_opts(mqar_reach=None)).cells[0].metrics


def test_oracle_scores_100_on_the_generation_tasks():
    configs = [
        NIAHConfig(kind="passkey", lengths=(300, 400), depths=(0.0, 1.0), samples_per_cell=2),
        NIAHConfig(kind="uuid", lengths=(450,), depths=(0.5,), samples_per_cell=2),
        BABILongConfig(task="qa2", lengths=(600,), samples_per_length=3),
        PasskeyCapacityConfig(lengths=(300, 500), samples_per_length=3),
    ]
    res = evaluate(_text_oracle(*configs), configs, options=_opts(stream_chunk=50, batch_size=2))
    assert len(res.cells) == 4 + 1 + 1 + 2
    for c in res.cells:
        assert c.status == "ok", c.message
        assert c.metrics["accuracy"] == 1.0, (c.task, c.params, c.samples)
        assert all(s["correct"] and s["prediction"].startswith(" " + s["answer"]) for s in c.samples)


def test_wrong_answers_score_zero():
    """The same oracle, asked about other prompts (another seed), never matches: scoring is not vacuous."""
    cfg = NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=3)
    (cell,) = evaluate(_text_oracle(cfg), cfg, seed=1, options=QUIET).cells
    assert cell.metrics["accuracy"] == 0.0 and cell.metrics["n"] == 3


def test_constant_model_scores_mqar_chance():
    """Predicting one fixed value token: each query's value is uniform over the V/2 values, so chance is 2/V."""
    V = 64
    cfg = MQARConfig(vocab_size=V, seq_len=48, num_kv_pairs=8, num_examples=400)
    (cell,) = evaluate(ConstantLM(V, default=40), cfg, options=_opts(batch_size=64)).cells
    n, p = cell.metrics["n"], 2 / V
    assert n == 400 * 8
    assert abs(cell.metrics["accuracy"] - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_constant_model_scores_babilong_chance():
    """Always answering "kitchen": qa1 answers are uniform over the 6 locations, so chance is 1/6; the accuracy is
    also exactly the share of samples whose answer is kitchen."""
    cfg = BABILongConfig(task="qa1", lengths=(420,), samples_per_length=240)
    model = ConstantLM(BYTES, default=ord("\n"), table=spelling_table(" kitchen.", after=":"))
    (cell,) = evaluate(model, cfg, options=_opts(batch_size=48)).cells
    share = sum(s.answer == "kitchen" for s in cfg.build(seed=0)) / 240
    assert cell.metrics["accuracy"] == pytest.approx(share)
    assert abs(cell.metrics["accuracy"] - 1 / 6) < 4 * math.sqrt((1 / 6) * (5 / 6) / 240)
    assert {s["prediction"] for s in cell.samples} == {" kitchen.\n\n"}


def test_induction_baseline_solves_mqar_and_passkey():
    """Exact lookup solves the passkey and MQAR whose noise never repeats a key; Zoology's noise, which may repeat a
    key followed by another token, misleads it (the most recent successor is then the noise's)."""
    res = evaluate(InductionLM(259), [NIAHConfig(lengths=(300,), depths=(0.3,), samples_per_cell=2)], options=QUIET)
    mqar = [MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8, num_examples=10, noise=noise)
            for noise in ("disjoint", "zoology")]
    res = res.merge(evaluate(InductionLM(128), mqar, options=QUIET))
    assert [c.metrics["accuracy"] for c in res.cells[:2]] == [1.0, 1.0]
    assert res.cells[2].metrics["accuracy"] < 1.0 and res.cells[2].metrics["context_value_rate"] < 1.0


# -- streaming, batching ----------------------------------------------------------------------------------------------

TASKS = [
    MQARConfig(vocab_size=BYTES, seq_len=96, num_kv_pairs=8, num_examples=6),
    NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=3),
    LMDataConfig(seq_len=64),
]


@pytest.mark.parametrize("make", [lambda: TinyRecurrentLM(BYTES), lambda: TinyAttentionLM(BYTES)],
                         ids=["recurrent", "attention"])
def test_streaming_and_batching_equal_one_shot(make):
    model = MnemosLMAdapter(make())
    one = evaluate(model, TASKS, options=_opts(lm_max_windows=6))
    for opts in (_opts(lm_max_windows=6, stream_chunk=13), _opts(lm_max_windows=6, stream_chunk=1, batch_size=1)):
        other = evaluate(model, TASKS, options=opts)
        for a, b in zip(one.cells, other.cells, strict=True):
            assert a.status == b.status == "ok"
            for key in ("accuracy", "correct", "n", "state_numel"):
                assert a.metrics.get(key) == b.metrics.get(key), (a.task, key)
            assert [s["prediction"] for s in a.samples] == [s["prediction"] for s in b.samples]
        lm_a, lm_b = one.cells[-1].metrics, other.cells[-1].metrics
        assert lm_a["tokens"] == lm_b["tokens"] == 6 * 64
        assert lm_a["loss"] == pytest.approx(lm_b["loss"], rel=1e-9)
    # random weights: the models answer something, and it is not the passkey
    assert all(s["prediction"] for s in one.cells[1].samples)


def test_lm_loss_matches_a_direct_computation():
    cfg = LMDataConfig(seq_len=32)
    model = TinyRecurrentLM(BYTES)
    (cell,) = evaluate(MnemosLMAdapter(model), cfg, options=_opts(lm_max_windows=3, stream_chunk=10)).cells
    val = cfg.build(0).val
    x = torch.stack([val[i * 32 : i * 32 + 33] for i in range(3)])  # [3, 33]
    logits, _ = model(x[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, BYTES), x[:, 1:].reshape(-1)).item()
    assert cell.metrics["loss"] == pytest.approx(ref, rel=1e-12)
    assert cell.metrics["perplexity"] == pytest.approx(math.exp(ref))


# -- refusing what a growing state cannot hold -------------------------------------------------------------------------

def test_attention_beyond_max_context_is_refused_not_crashed():
    cfg = NIAHConfig(kind="passkey", lengths=(300, 600), depths=(0.5,), samples_per_cell=2)
    short = MnemosLMAdapter(TinyAttentionLM(BYTES, max_context=350))
    assert short.state_growth == "growing" and short.max_context == 350
    res = evaluate([short, MnemosLMAdapter(TinyRecurrentLM(BYTES))], cfg, options=QUIET)
    (a300, a600, r300, r600) = res.cells
    assert a300.status == "ok" and a300.metrics["n"] == 2
    assert a600.status == "refused" and not a600.metrics
    assert "600" in a600.message and "max context" in a600.message and "350" in a600.message
    assert r300.status == r600.status == "ok"  # a constant-state model has no such limit
    assert "refused [1]" in res.markdown() and "max context" in res.markdown()


def test_memory_budget_refuses_growing_states_only():
    attention, recurrent = MnemosLMAdapter(TinyAttentionLM(BYTES, dim=8)), MnemosLMAdapter(TinyRecurrentLM(BYTES))
    assert attention.bytes_per_token() == 2 * 8 * 8  # k and v, D = 8, float64
    assert recurrent.bytes_per_token() == 0
    budget = 400 * 128 / 2**30  # room for 400 tokens of one sequence
    cfg = PasskeyCapacityConfig(lengths=(300, 600), samples_per_length=2)
    res = evaluate([attention, recurrent], cfg, options=_opts(memory_budget_gb=budget, batch_size=8))
    assert [c.status for c in res.cells] == ["ok", "refused", "ok", "ok"]
    assert "memory budget" in res.cells[1].message
    assert res.cells[0].metrics["state_bytes"] == 300 * 128  # state after the prompt, per sequence
    assert res.cells[0].metrics["batch_size"] == 1 and res.cells[2].metrics["batch_size"] == 8  # cut to fit


def test_default_budget_refuses_what_the_machine_cannot_hold():
    class Huge(MnemosLMAdapter):
        def bytes_per_token(self):
            return 2.0**40  # a TiB per token: nothing fits

    assert 0.1 < auto_memory_budget_gb("cpu") < float("inf")
    cfg = NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=1)
    (cell,) = evaluate(Huge(TinyAttentionLM(BYTES)), cfg, options=QUIET).cells
    assert cell.status == "refused" and "automatic memory budget" in cell.message
    (cell,) = evaluate(Huge(TinyAttentionLM(BYTES)), cfg, options=_opts(memory_budget_gb=None)).cells
    assert cell.status == "ok"


def test_constant_state_stays_constant_along_a_long_stream():
    cfg = PasskeyCapacityConfig(lengths=(1024, 8192), samples_per_length=1)
    opts = _opts(stream_chunk=1024)
    rec = evaluate(MnemosLMAdapter(TinyRecurrentLM(BYTES)), cfg, options=opts).cells
    att = evaluate(MnemosLMAdapter(TinyAttentionLM(BYTES)), cfg, options=opts).cells
    assert rec[0].metrics["state_bytes"] == rec[1].metrics["state_bytes"] == 8 * 8
    assert att[1].metrics["state_bytes"] > 7.9 * att[0].metrics["state_bytes"]


# -- adapters ---------------------------------------------------------------------------------------------------------

def test_mnemos_adapter_needs_to_know_the_state_growth():
    model = TinyRecurrentLM(BYTES, variant="mystery")
    with pytest.raises(ValueError, match="state_growth"):
        MnemosLMAdapter(model)
    assert MnemosLMAdapter(model, state_growth="constant").name == "mystery"
    with pytest.raises(TypeError, match="init_cache"):
        MnemosLMAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="MnemosLMAdapter"):
        evaluate(TinyRecurrentLM(BYTES), TASKS[0], options=QUIET)


def test_hf_adapter_streams_past_key_values_and_reencodes_prompts():
    model = HFCausalLMAdapter(FakeHFCausalLM(258, max_position_embeddings=330), FakeHFTokenizer())
    assert model.state_growth == "growing" and model.max_context == 330
    cfg = NIAHConfig(kind="passkey", lengths=(300, 400), depths=(0.5,), samples_per_cell=2)
    one = evaluate(model, cfg, options=QUIET).cells
    streamed = evaluate(model, cfg, options=_opts(stream_chunk=16)).cells
    assert one[0].metrics["tokens"] == 301  # the BOS the tokenizer adds
    assert [s["prediction"] for s in one[0].samples] == [s["prediction"] for s in streamed[0].samples]
    assert one[1].status == "refused" and "330" in one[1].message


def test_hf_from_pretrained_without_transformers_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers"):
        HFCausalLMAdapter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ImportError, match=r"mnemos\[hf\]"):
        load_model(str(tmp_path), vocab_size=BYTES)


def test_load_model_specs():
    assert load_model("baseline:induction:4", vocab_size=64).name == "induction-4"
    assert load_model("baseline:random", vocab_size=64).vocab_size == 64
    for bad, names in (("baseline:oracle", "unknown baseline 'oracle'"), ("no/such/path", "model 'no/such/path'"),
                       ("baseline:induction:x", "integer order, got 'x'")):
        with pytest.raises(ValueError, match=names):
            load_model(bad, vocab_size=64)


def test_state_size_walks_nested_states():
    from mnemos.layers.kv_cache import FullKVCache

    kv = FullKVCache(2, 3, 4)  # B=2, H=3, D=4
    kv.update(torch.zeros(2, 5, 3, 4), torch.zeros(2, 5, 3, 4))
    state = {"layers": [kv, (torch.zeros(2, 7, dtype=torch.float64), None)], "pos": 5}
    kv_numel = 2 * 5 * 3 * 4 * 2
    assert state_size(state) == (kv_numel + 14, kv_numel * 4 + 14 * 8, kv_numel * 4 + 14 * 8)
    big = torch.zeros(100, 8)
    assert state_size({"view": big[-2:]}) == (16, 64, 3200)  # a view keeps its whole storage alive


def test_state_size_counts_each_element_once():
    w = torch.randn(2, 3, 8, 4)  # a stacked [W; S] of 4 rows each, as the memory rule keeps its state
    W, S = w[:, :, :4], w[:, :, 4:]
    assert state_size([W, S]) == (192, 768, 768)
    assert state_size([W, S, w[:, :, :4]]) == (192, 768, 768)  # a second view of W (the anchor at a boundary)
    assert state_size([W, S, W.clone()]) == (288, 1152, 1152)  # a copy (the anchor mid-chunk) is more state
    assert state_size([w[:, :, :6], w[:, :, 2:]]) == (192, 768, 768)  # overlapping views: the union
    assert state_size([w[:, :, :3], w[:, :, 5:]]) == (144, 576, 768)  # disjoint ones: their sum; the storage whole
    assert state_size([w.view(-1)[::2], w.view(-1)[1::2]]) == (192, 768, 768)  # interleaved strides
    assert state_size([w[..., :2], w.view(torch.int32)[..., 1:3]]) == (144, 576, 768)  # dtypes reinterpreted


def test_memory_state_at_a_chunk_boundary_holds_its_anchor_once():
    from mnemos.layers import NeuralMemory

    mem = NeuralMemory(16, heads=2, depth=1, chunk_size=4)
    with torch.no_grad():
        _, boundary = mem(torch.randn(1, 8, 16))
        _, mid = mem(torch.randn(1, 6, 16))
    assert boundary.memory.offset == 0 and mid.memory.offset == 2
    per_matrix = 2 * 8 * 8  # heads x D x D
    # boundary: weights and momentum (the anchor is the weights); mid-chunk: the anchor is a third matrix
    assert state_size(boundary.memory).numel == 2 * per_matrix
    assert state_size(mid.memory).numel == 3 * per_matrix


def test_options_are_validated():
    bad_options = ({"batch_size": 0}, {"stream_chunk": 0}, {"memory_budget_gb": -1.0}, {"memory_budget_gb": "big"},
                   {"capacity_threshold": 0.0}, {"mqar_reach": -1}, {"mqar_reach": "far"})
    for bad in bad_options:
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} must be"):  # the message names the option
            EvalOptions(**bad)
    with pytest.raises(ValueError, match="seed"):
        evaluate(InductionLM(64), TASKS[0], seed=-1)


def test_text_progress_bar_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = io.StringIO()
    bar = progress_bar(1000, "model", True, file=out)
    bar.update(1000)
    bar.close()
    assert "model [########################] 100%" in out.getvalue()
    assert type(progress_bar(10, "x", None, file=io.StringIO())).__name__ == "ProgressBar"  # not a tty: silent


@pytest.mark.parametrize("cfg", [MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4, num_examples=4),
                                 NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=1)],
                         ids=["scored", "greedy"])
def test_non_finite_logits_are_an_error_not_a_score(cfg):
    """A model whose state overflows returns NaN logits; argmax would still answer (silently wrong), so the cell
    reports an error naming it instead."""
    class Overflowing(TinyRecurrentLM):
        def forward(self, input_ids, cache=None):
            logits, cache = super().forward(input_ids, cache)
            return logits.masked_fill(torch.ones_like(logits, dtype=torch.bool), float("nan")), cache

    with pytest.warns(UserWarning, match="non-finite logits"):  # the harness warns about every failed cell
        (cell,) = evaluate(MnemosLMAdapter(Overflowing(BYTES)), cfg, options=QUIET).cells
    assert cell.status == "error" and "non-finite logits for positions 0.." in cell.message
