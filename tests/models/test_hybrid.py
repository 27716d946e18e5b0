"""Hybrid stacks (``MnemosConfig.layers``, variant "hybrid"): one registered variant per block.

A hybrid runs through the invariants of a variant (float64, tiny sizes): decoding == one forward, pieces == one call
(logits and cache), causality, batch independence, the cache's save / load mid-stream, the HF round trip, a training
run resumed bit-exactly; a hybrid of one variant repeated is that variant; what the registry says of a variant (state
growth, reach, reads) it says of the stack; bad ``layers`` are errors naming ``model.layers``; old configs load.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from mnemos.eval.tasks.mqar import model_reach
from mnemos.models import Cache, MnemosConfig, MnemosLM, saved_model_config
from mnemos.models.registry import stack_reach, variant_spec
from model_helpers import check_training_resumes_bit_exactly, close, random_ids

F64 = torch.float64
V = 32
TINY = dict(vocab_size=V, d_model=16, n_heads=2, window=4, init_std=0.5, memory=dict(conv_size=3))
# recurrent, windowed, routed and full-attention blocks: every kind of state in one stack
LAYERS = ["gated_deltanet", "swa", "mom", "transformer"]


def config(layers=LAYERS, **kw) -> MnemosConfig:
    n = len(layers) if layers[-1] != "..." else kw.pop("n_layers")
    return MnemosConfig.from_dict({**TINY, "variant": "hybrid", "layers": list(layers), "n_layers": n, **kw})


def make(cfg: MnemosConfig, seed: int = 0) -> MnemosLM:
    torch.manual_seed(seed)
    return MnemosLM(cfg).to(F64).eval()


def ids_of(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_ids(V, B, T, seed)


def same_cache(name: str, a: Cache, b: Cache) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{name}: keys differ: {sorted(set(sa) ^ set(sb))}"
    for k in sa:
        close(f"{name}[{k}]", sa[k].double(), sb[k].double())


# ----------------------------------------------------------------------------------------------------------------------
# the invariants


def test_blocks_and_states_are_per_layer():
    model = make(config())
    assert [type(b.mixer).__name__ for b in model.blocks] == [
        "LinearRecurrence", "Attention", "MixtureOfMemories", "Attention"]
    assert model.blocks[1].mixer.window == 4 and model.blocks[3].mixer.window is None
    states = model.init_cache(2).layers
    assert [type(s) for s in states] == [variant_spec(v).state for v in LAYERS]


def test_decoding_pieces_causality_and_batch_independence():
    model, ids = make(config()), ids_of(3, 13)
    with torch.no_grad():
        full, _ = model(ids)
        cache, steps = model.init_cache(3), []
        for t in range(13):
            logits, cache = model(ids[:, t : t + 1], cache)
            steps.append(logits)
        close("token by token", full, torch.cat(steps, 1), 1e-9)
        one = model.init_cache(3)
        _, one = model(ids, one)
        pieces, outs = model.init_cache(3), []
        for a, b in zip((0, 1, 6, 7), (1, 6, 7, 13), strict=True):
            logits, pieces = model(ids[:, a:b], pieces)
            outs.append(logits)
        close("pieces", full, torch.cat(outs, 1))
        same_cache("cache after pieces", one, pieces)
        same_cache("cache after steps", one, cache)
        for cut in (1, 5, 9):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 1) % V
            out, _ = model(changed)
            close(f"logits before {cut}", full[:, :cut], out[:, :cut], 1e-12)
            assert (full[:, cut] - out[:, cut]).abs().max() > 1e-6, f"token {cut} changed nothing"
        for i in range(3):
            close(f"sample {i} alone", full[i : i + 1], model(ids[i : i + 1])[0], 1e-12)
        out = model.generate(ids[:, :5], 4)
        again, _ = model(out)
    assert torch.equal(out[:, 5:], again[:, 4:-1].argmax(-1)), "generate != forward's argmax"


def test_cache_and_model_save_load(tmp_path):
    cfg = config()
    model, ids = make(cfg), ids_of(2, 14)
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.init_cache(2)
        _, cache = model(ids[:, :8], cache)
        buf = io.BytesIO()
        torch.save(cache.state_dict(), buf)
        buf.seek(0)
        # the model through its config's JSON and its weights, the cache through plain tensors
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
        torch.save(model.state_dict(), tmp_path / "model.pt")
        loaded = MnemosLM(MnemosConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))).to(F64).eval()
        loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        restored = loaded.init_cache(2)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        rest, _ = loaded(ids[:, 8:], restored)
    assert loaded.config == cfg
    close("restored continuation", full[:, 8:], rest)


def test_hugging_face_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from mnemos.models.hf import MnemosHFConfig

    hf_cfg = MnemosHFConfig.from_mnemos(config(["gated_deltanet", "swa", "..."], n_layers=4, tie_embeddings=False))
    assert hf_cfg.layers == ["gated_deltanet", "swa", "gated_deltanet", "swa"]  # stored expanded
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.to_mnemos() == hf_cfg.to_mnemos()
    ids = ids_of(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    out = back.generate(ids[:, :4], do_sample=False, max_new_tokens=3)
    assert torch.equal(out, back.model.generate(ids[:, :4], 3))


def test_training_resumes_bit_exactly(tmp_path):
    """The resume check compares the union of the blocks' reads (and the list of layers as saved in JSON)."""
    check_training_resumes_bit_exactly(tmp_path, ["model.variant=hybrid", "model.layers=[gated_deltanet, swa]"],
                                       "model.window=3", "model.window")


# ----------------------------------------------------------------------------------------------------------------------
# a hybrid of one variant repeated is that variant


@pytest.mark.parametrize("variant", ["gated_deltanet", "mal"])
def test_one_variant_repeated_is_that_variant(variant):
    plain_cfg = MnemosConfig.from_dict({**TINY, "variant": variant, "n_layers": 2, "num_persistent": 1})
    hybrid_cfg = config([variant, "..."], n_layers=2, num_persistent=1)
    plain, hybrid = make(plain_cfg), make(hybrid_cfg)
    plain_sd = plain.state_dict()
    assert plain_sd.keys() == hybrid.state_dict().keys()
    assert all(torch.equal(plain_sd[k], v) for k, v in hybrid.state_dict().items())  # same init, same seed
    torch.manual_seed(9)
    hybrid = MnemosLM(hybrid_cfg).to(F64).eval()
    hybrid.load_state_dict(plain_sd)  # the same weights mapped (the same names)
    ids = ids_of(2, 11)
    with torch.no_grad():
        a, ca = plain(ids, plain.init_cache(2))
        b, cb = hybrid(ids, hybrid.init_cache(2))
    assert torch.equal(a, b)
    same_cache("cache", ca, cb)
    assert hybrid.state_growth == plain.state_growth and model_reach(hybrid) == model_reach(plain)


# ----------------------------------------------------------------------------------------------------------------------
# what the registry says of a stack


def test_state_growth_reach_and_reads():
    sizes = []
    for layers in (["gated_deltanet", "swa", "mom"], LAYERS):
        model = make(config(layers))
        with torch.no_grad():
            n = [model(ids_of(1, T), model.init_cache(1))[1].num_elements() for T in (12, 24)]
        sizes.append(n)
        assert model.state_growth == ("growing" if "transformer" in layers else "constant")
    assert sizes[0][0] == sizes[0][1] and sizes[1][1] > sizes[1][0], sizes
    # reach: the windows of the sliding-window blocks, none when a block sees every token or none has a window
    assert stack_reach(config(["gated_deltanet", "swa", "swa", "mal"])) == 3 * 3
    assert model_reach(make(config(["gated_deltanet", "swa"]))) == 3
    assert stack_reach(config(["swa", "transformer"])) is None
    assert stack_reach(config(["gated_deltanet", "mom"])) is None
    plain = MnemosConfig.from_dict({**TINY, "variant": "swa", "n_layers": 3})
    assert stack_reach(plain) == variant_spec("swa").reach(plain) == 9
    # reads: the union of the blocks' reads
    cfg = config(["gated_deltanet", "swa"])
    assert cfg.reads_field("window") and cfg.reads_field("memory.conv_size") and cfg.reads_field("layers")
    assert not cfg.reads_field("mom.top_k") and not cfg.reads_field("memory.max_lr")
    assert not config(["gated_deltanet", "mom"]).reads_field("window")


def test_a_hybrid_sums_its_blocks_aux_losses():
    model = make(config())
    model(ids_of(2, 6))
    close("aux loss", model.blocks[2].mixer.aux_loss, model.aux_loss(), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# the config


def test_pattern_and_round_trip():
    cfg = config(["gated_deltanet", "gated_deltanet", "transformer", "..."], n_layers=6)
    assert cfg.layers == ("gated_deltanet", "gated_deltanet", "transformer") * 2 == cfg.block_variants
    assert cfg.to_dict()["layers"] == list(cfg.layers)
    assert MnemosConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    plain = MnemosConfig(variant="swa", n_layers=3)
    assert plain.layers is None and plain.block_variants == ("swa",) * 3


@pytest.mark.parametrize("change,message", [
    ({"layers": ["gated_deltanet", "titan"]}, r"model\.layers\[1\]: unknown variant 'titan'"),
    ({"layers": ["gated_deltanet", "swa", "swa"]}, r"model\.layers must name one variant per block: 3 for "
                                                   r"model\.n_layers = 2"),
    ({"layers": ["swa", "transformer", "swa", "..."]}, r"model\.layers: the pattern .* length that divides"),
    ({"layers": ["hybrid", "swa"]}, r"model\.layers\[0\]: unknown variant 'hybrid'"),
    ({"layers": "swa"}, r"model\.layers must be a list"),
    ({"layers": ["swa", 3]}, r"model\.layers\[1\] must be of type str"),
    ({"variant": "swa"}, r"model\.layers makes a hybrid stack: set model\.variant=hybrid"),
    ({"layers": None}, r"model\.variant 'hybrid' needs model\.layers"),
    ({"layers": ["gated_deltanet", "swa"], "d_model": 18, "n_heads": 6}, r"variant 'swa' uses RoPE"),
])
def test_bad_layers_are_errors_naming_them(change, message):
    d = {**TINY, "variant": "hybrid", "n_layers": 2, "layers": ["gated_deltanet", "swa"], **change}
    with pytest.raises(ValueError, match=message):
        MnemosConfig.from_dict(d)


def test_old_configs_load_unchanged():
    """A config saved before hybrid stacks and MoM (no "layers", no "mom") builds the model it built."""
    old = {k: v for k, v in MnemosConfig(variant="gated_deltanet", vocab_size=V).to_dict().items()
           if k not in ("layers", "mom")}
    assert saved_model_config(old)["layers"] is None
    assert MnemosConfig.from_dict(saved_model_config(old)) == MnemosConfig.from_dict(old) == \
        MnemosConfig(variant="gated_deltanet", vocab_size=V)
