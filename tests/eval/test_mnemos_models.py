"""The harness on real mnemos models: streaming equals one call, state growth is classified and measured right,
and a training checkpoint loads by path."""

import warnings
from contextlib import contextmanager

import pytest
import torch

from mnemos.data import LMDataConfig, PasskeyCapacityConfig
from mnemos.eval import EvalOptions, MnemosLMAdapter, build_mnemos_model, evaluate, load_model
from mnemos.eval.adapters import spec_overrides
from mnemos.models import MnemosConfig, MnemosLM
from mnemos.train.checkpoint import save_checkpoint

BYTES = 259
TASK = PasskeyCapacityConfig(lengths=(300, 600), samples_per_length=2)


def _tiny(variant: str, **kw) -> MnemosLM:
    torch.manual_seed(0)
    cfg = MnemosConfig(variant=variant, vocab_size=kw.pop("vocab_size", BYTES), d_model=32, n_layers=2, n_heads=4,
                       window=16, segment_len=16, **kw)
    return MnemosLM(cfg)


@pytest.mark.parametrize("variant", ["lmm", "transformer", "swa", "gated_deltanet"])
def test_streamed_and_one_call_give_the_same_answers(variant):
    model = MnemosLMAdapter(_tiny(variant))
    one = evaluate(model, TASK, options=EvalOptions(progress=False, raise_errors=True))
    streamed = evaluate(model, TASK, options=EvalOptions(progress=False, raise_errors=True, stream_chunk=111))
    for a, b in zip(one.cells, streamed.cells, strict=True):
        assert a.status == b.status == "ok"
        assert [s["prediction"] for s in a.samples] == [s["prediction"] for s in b.samples]
        assert a.metrics["state_bytes"] == b.metrics["state_bytes"]
    short, long = (c.metrics["state_bytes"] for c in one.cells)
    if variant == "transformer":
        assert model.state_growth == "growing" and long == 2 * short == 2 * 300 * model.bytes_per_token()
    else:
        assert model.state_growth == "constant" and long == short


def test_checkpoint_directory_loads_by_path(tmp_path):
    model = _tiny("lmm")
    path = save_checkpoint(tmp_path / "lmm-step1", model, step=1,
                           config={"model": model.config.to_dict(), "task": {"kind": "lm", "seq_len": 64}})
    loaded = load_model(str(path), vocab_size=BYTES, device="cpu")
    assert loaded.name == "lmm-step1" and loaded.tokenizer is None
    opts = EvalOptions(progress=False, raise_errors=True, lm_max_windows=2)
    tasks = [PasskeyCapacityConfig(lengths=(300,), samples_per_length=2), LMDataConfig(seq_len=64)]
    a, b = evaluate(MnemosLMAdapter(model), tasks, options=opts), evaluate(loaded, tasks, options=opts)
    assert [c.metrics for c in a.cells] == [
        {**c.metrics, "tokens_per_second": a_c.metrics["tokens_per_second"]}
        for c, a_c in zip(b.cells, a.cells, strict=True)
    ]
    assert b.cells[0].model["config"]["variant"] == "lmm"


def test_a_checkpoint_saved_before_ema_momentum_keeps_its_gates(tmp_path):
    model = _tiny("mag", memory={"ema_momentum": False})
    saved = model.config.to_dict()
    del saved["memory"]["ema_momentum"]  # what a checkpoint written before the option holds
    path = save_checkpoint(tmp_path / "old", model, step=1, config={"model": saved})
    loaded = load_model(str(path), vocab_size=BYTES, device="cpu")
    assert loaded.model.config.memory.ema_momentum is False
    ids = torch.randint(0, BYTES, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0])


def test_build_mnemos_model_wraps_an_untrained_mnemos_lm():
    model = build_mnemos_model("deltanet", BYTES, overrides={"d_model": 32, "n_heads": 4, "n_layers": 1,
                                                            "memory": {"chunk_size": 8}})
    assert isinstance(model, MnemosLMAdapter) and isinstance(model.model, MnemosLM)
    assert model.name == "deltanet (untrained)" and model.vocab_size == BYTES and model.state_growth == "constant"
    assert (model.model.config.variant, model.model.config.d_model, model.model.config.memory.chunk_size) == (
        "deltanet", 32, 8)
    with pytest.raises(ValueError, match="unknown mnemos variant 'titans'"):
        build_mnemos_model("titans", BYTES)


@contextmanager
def _no_warning():
    """A warning inside is an error: a bad spec gets its error alone, not the untrained-model warning first."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_variant_specs_build_untrained_models():
    with pytest.warns(UserWarning, match="randomly initialised"):
        m = load_model("swa:d_model=32,n_heads=4,n_layers=1,window=8", vocab_size=BYTES, device="cpu")
    assert m.name == "swa:d_model=32,n_heads=4,n_layers=1,window=8 (untrained)"
    assert m.model.config.window == 8 and m.state_growth == "constant"
    with pytest.raises(ValueError, match="unknown MnemosConfig keys"), _no_warning():
        load_model("lmm:d_modle=32", vocab_size=BYTES)
    with pytest.raises(ValueError, match="d_model"), _no_warning():
        load_model("lmm:d_model=1.5", vocab_size=BYTES)


def test_variant_specs_take_the_train_override_grammar():
    spec = "mac:model.d_model=32,model.n_heads=4,model.memory.chunk_size=8,model.memory.max_lr=1e-2"
    with pytest.warns(UserWarning, match="randomly initialised"):
        m = load_model(spec, vocab_size=BYTES, device="cpu")
    assert (m.model.config.d_model, m.model.config.memory.chunk_size, m.model.config.memory.max_lr) == (32, 8, 0.01)
    assert spec_overrides("model.window=8,memory.depth=1") == {"window": 8, "memory": {"depth": 1}}  # both forms
    # a list value keeps its commas: a hybrid stack from the command line
    assert spec_overrides("n_layers=3,layers=[gated_deltanet, swa,'transformer'],window=4") == {
        "n_layers": 3, "layers": ["gated_deltanet", "swa", "transformer"], "window": 4}
    with pytest.warns(UserWarning, match="randomly initialised"):
        m = load_model("hybrid:d_model=32,n_heads=4,n_layers=2,layers=[gated_deltanet,swa]", vocab_size=BYTES, device="cpu")
    assert tuple(m.model.config.layers) == ("gated_deltanet", "swa")
    with pytest.raises(ValueError, match="unbalanced brackets"), _no_warning():
        load_model("hybrid:layers=[gated_deltanet,swa", vocab_size=BYTES)
    with pytest.raises(ValueError, match="unknown MnemosConfig keys"), _no_warning():
        load_model("lmm:model.optim.lr=1e-3", vocab_size=BYTES)
