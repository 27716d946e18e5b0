"""The Hugging Face wrappers (mnemos.models.hf): config mirroring and validation, Auto registration, safetensors
save/load round trips, and ``generate`` against a from-scratch argmax loop over ``MnemosLM``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mnemos.models import VARIANTS, Cache, MemoryConfig, MnemosConfig  # noqa: E402
from mnemos.models.hf import MnemosForCausalLM, MnemosHFConfig  # noqa: E402

AutoConfig, AutoModelForCausalLM = transformers.AutoConfig, transformers.AutoModelForCausalLM

torch.set_num_threads(1)

V = 64
# tiny sizes; window 5 and segment 6 are exceeded by the prompts + generated tokens below, memory chunk 4 does not
# divide the segment. impl "torch": generate runs under no_grad
TINY = dict(
    vocab_size=V, d_model=32, n_layers=2, n_heads=4, window=5, segment_len=6, num_persistent=2, init_std=0.5,
    memory={"chunk_size": 4, "impl": "torch"}, mac_attn_init_scale=1.0,
)


def tiny(variant: str, **kw) -> MnemosHFConfig:
    return MnemosHFConfig(**{**TINY, "variant": variant, **kw})


def build(variant: str, seed: int = 0, **kw) -> MnemosForCausalLM:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny(variant, **kw)).eval()


def test_config_mirrors_mnemos_config():
    hf_fields = {f.name: f for f in dataclasses.fields(MnemosHFConfig)}
    for f in dataclasses.fields(MnemosConfig):
        assert f.name in hf_fields, f"MnemosHFConfig lacks MnemosConfig field {f.name!r}"
    # same defaults: the default HF config converts to the default MnemosConfig
    assert MnemosHFConfig().to_mnemos() == MnemosConfig()
    cfg = MnemosConfig(variant="mag", **{k: v for k, v in TINY.items() if k != "memory"}, memory={"depth": 1})
    hf = MnemosHFConfig.from_mnemos(cfg)
    assert hf.to_mnemos() == cfg
    assert hf.memory == MemoryConfig(depth=1).to_dict()  # stored resolved
    assert hf.hidden_size == 32 and hf.num_hidden_layers == 2 and hf.tie_word_embeddings is True


def test_config_sections_round_trip(tmp_path):
    """The baselines' sections (mamba2, based) are dicts in the HF config, stored resolved, checked by MnemosConfig,
    and a config.json written before they existed loads with their defaults."""
    hf = tiny("mamba2", mamba2={"d_state": 4})
    assert hf.mamba2 == {**MnemosConfig().mamba2.to_dict(), "d_state": 4} and hf.based == MnemosConfig().based.to_dict()
    assert hf.to_mnemos().mamba2.d_state == 4
    hf.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).to_mnemos() == hf.to_mnemos()
    d = json.loads((tmp_path / "config.json").read_text())
    del d["mamba2"], d["based"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert AutoConfig.from_pretrained(tmp_path).to_mnemos().mamba2 == MnemosConfig().mamba2
    with pytest.raises(ValueError, match=r"model\.based\.feature_dim must be >= 1"):
        tiny("based", based={"feature_dim": 0})
    with pytest.raises(ValueError, match=r"unknown Mamba2Config keys"):
        tiny("mamba2", mamba2={"dstate": 4})


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown MnemosHFConfig keys \['windw'\]"):
        MnemosHFConfig(variant="swa", windw=8)
    with pytest.raises(ValueError, match=r"memory\.chunk"):
        MnemosHFConfig(memory={"chunk": 8})
    with pytest.raises(ValueError, match="n_heads"):
        MnemosHFConfig(d_model=32, n_heads=5)
    with pytest.raises(ValueError, match="variant"):
        MnemosHFConfig(variant="mamba")
    # the same checks apply to a saved config.json
    tiny("lmm").save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["segment_length"] = 8
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="segment_length"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_config_builds_every_variant(variant):
    model = build(variant)
    assert isinstance(model, MnemosForCausalLM)
    assert model.model.config == tiny(variant).to_mnemos()
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        out = model(ids)
        ref, _ = model.model(ids, use_cache=True)  # the same path: a cached pass from position 0
    assert out.logits.shape == (2, 7, V) and isinstance(out.cache, Cache) and out.cache.position == 7
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("variant,tie", [("lmm", True), ("mac", True), ("swa", True), ("mag", False), ("mamba2", True),
                                         ("based", False), ("mom", True)])
def test_save_pretrained_round_trip(variant, tie, tmp_path):
    model = build(variant, seed=1, tie_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert isinstance(loaded, MnemosForCausalLM) and loaded.dtype == torch.float32
    assert loaded.config.to_mnemos() == model.config.to_mnemos()
    assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tie
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal", "transformer", "deltanet"])
def test_generate_matches_argmax_loop(variant):
    # untied head: with a tied one the argmax of a random model mostly repeats the last token whatever the context,
    # and a generate that mishandles the cache would still match
    model = build(variant, seed=2, tie_embeddings=False)
    prompt = torch.randint(0, V, (2, 5))
    out = model.generate(prompt, do_sample=False, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: recompute the whole sequence each step
            logits, _ = model.model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("variant", ["lmm", "mag", "mal"])
def test_generate_carries_flat_mnemos_cache(variant):
    model = build(variant, seed=3)
    prompt = torch.randint(0, V, (1, 4))
    sizes = []
    for n in (6, 14):
        out = model.generate(
            prompt, do_sample=False, max_new_tokens=n, return_dict_in_generate=True
        )
        assert isinstance(out.cache, Cache)
        assert out.cache.position == 4 + n - 1  # the last generated token is never fed back
        sizes.append(out.cache.num_elements())
    assert sizes[0] == sizes[1]


def test_right_padding_is_rejected():
    """Left padding is supported (tests/models/test_padding.py); right padding is a ValueError naming the mask."""
    model = build("lmm")
    ids = torch.randint(0, V, (2, 4))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="attention_mask row 0 has a 0 after a 1.*left padding"):
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2)


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "transformer", "gated_deltanet"])
def test_beam_search_with_the_cache_equals_beam_search_without(variant):
    """Beam search reorders the cache every step; recomputing every beam from scratch (use_cache=False) must pick
    the same beams. A reorder that left any stream's state (memory, conv, attention, MAC segment) behind diverges."""
    model = build(variant, seed=4, tie_embeddings=False)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=9, return_dict_in_generate=True,
              output_scores=True)
    cached = model.generate(prompt, use_cache=True, **kw)
    fresh = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(cached.sequences_scores, fresh.sequences_scores)
    assert not torch.equal(cached.sequences[0], cached.sequences[1])  # two different beams came back


def test_cache_reorder_moves_every_stream():
    """Cache.reorder: stream i of the result continues stream index[i]: feeding it the swapped next tokens equals
    running the swapped prompts from the start."""
    torch.manual_seed(0)
    model = build("mac", seed=5).model
    a, b = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 3))
    with torch.no_grad():
        _, cache = model(a, model.init_cache(2))
        got, _ = model(b.flip(0), cache.reorder(torch.tensor([1, 0])))
        want, _ = model(torch.cat([a, b], 1).flip(0))
    torch.testing.assert_close(got, want[:, 7:])
    with pytest.raises(ValueError, match="index must be a 1-D integer tensor of 2"):
        cache.reorder(torch.tensor([0]))
    with pytest.raises(ValueError, match="index values must lie in"):
        cache.reorder(torch.tensor([0, 2]))


def test_a_model_saved_before_ema_momentum_loads_with_the_old_gates(tmp_path):
    """config.json written before ``memory.ema_momentum`` existed: the model comes back with the free theta it was
    trained with (not today's default), and generates exactly what it did."""
    model = build("mag", seed=6, memory={"chunk_size": 4, "impl": "torch", "ema_momentum": False})
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    saved = json.loads(cfg_path.read_text())
    del saved["memory"]["ema_momentum"]
    cfg_path.write_text(json.dumps(saved))
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.memory["ema_momentum"] is False
    prompt = torch.randint(0, V, (1, 6))
    assert torch.equal(back.generate(prompt, do_sample=False, max_new_tokens=6),
                       model.generate(prompt, do_sample=False, max_new_tokens=6))
    assert MnemosHFConfig(**TINY).memory["ema_momentum"] is True  # a config made now gets the default
