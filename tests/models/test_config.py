"""MnemosConfig: validation with clear errors, unknown keys named, dict round trips (what a HF wrapper mirrors)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mnemos.layers import MemorySettings, NeuralMemory
from mnemos.models import VARIANTS, MemoryConfig, MnemosConfig, MnemosLM, saved_model_config

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"window": 0}, ValueError, "window must be >= 1, got 0"),
        ({"window": -3}, ValueError, "window must be >= 1, got -3"),
        ({"n_heads": 3}, ValueError, r"model.n_heads \(3\) must divide model.d_model \(32\)"),
        ({"variant": "mamba"}, ValueError, "unknown variant 'mamba'"),
        ({"segment_len": 0}, ValueError, "segment_len must be >= 1, got 0"),
        ({"num_persistent": -1}, ValueError, "num_persistent must be >= 0"),
        ({"d_model": 0}, ValueError, "d_model must be >= 1"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1"),
        ({"n_layers": 0}, ValueError, "n_layers must be >= 1"),
        ({"mlp_hidden": 0}, ValueError, "mlp_hidden must be None or >= 1"),
        ({"norm_eps": 0.0}, ValueError, "norm_eps must be > 0"),
        ({"rope_base": 1.0}, ValueError, "rope_base must be > 1"),
        ({"d_model": 36, "n_heads": 4, "variant": "swa"}, ValueError, "even head dim"),  # head dim 9, RoPE
        ({"window": 2.5}, TypeError, "window must be of type int"),
        ({"window": True}, TypeError, "window must be of type int"),
        ({"tie_embeddings": "yes"}, TypeError, "tie_embeddings must be of type bool"),
        ({"memory": {"chunk_size": 0}}, ValueError, "memory.chunk_size must be >= 1, got 0"),
        ({"memory": {"activation": "relu"}}, ValueError, r"memory.activation must be one of \('gelu', 'silu'\)"),
        ({"memory": {"max_lr": -0.1}}, ValueError, "memory.max_lr must be > 0"),
        ({"memory": 3}, TypeError, "memory must be a MemoryConfig or a dict"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_configs_are_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        MnemosConfig(**{**SMALL, **overrides})


def test_odd_head_dim_is_fine_without_attention():
    for variant in ("lmm", "linear_attention", "deltanet", "gated_deltanet"):
        MnemosConfig(**{**SMALL, "d_model": 36, "variant": variant})


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown MnemosConfig keys \['model.segment_length'\]"):
        MnemosConfig.from_dict({"variant": "mac", "segment_length": 8})
    with pytest.raises(ValueError, match=r"unknown MemoryConfig keys \['model.memory.chunk'\]"):
        MnemosConfig.from_dict({"memory": {"chunk": 8}})
    with pytest.raises(TypeError, match="needs a dict"):
        MnemosConfig.from_dict([("variant", "mac")])


@pytest.mark.parametrize("variant", VARIANTS)
def test_dict_round_trip_is_json_ready(variant):
    cfg = MnemosConfig(**SMALL, variant=variant, memory=MemoryConfig(depth=1, chunk_size=8))
    d = cfg.to_dict()
    assert d["memory"]["depth"] == 1 and d["variant"] == variant
    again = MnemosConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert isinstance(again.memory, MemoryConfig)


def test_derived_sizes():
    cfg = MnemosConfig(**SMALL)
    assert cfg.head_dim == 8
    assert cfg.mlp_hidden_size == 88  # ceil(8 * 32 / 3) = 86, rounded up to a multiple of 8
    assert MnemosConfig(**SMALL, mlp_hidden=40).mlp_hidden_size == 40


def test_model_needs_a_config_and_unties_on_request():
    with pytest.raises(TypeError, match="MnemosConfig"):
        MnemosLM({"variant": "lmm"})
    model = MnemosLM(MnemosConfig(**SMALL, variant="swa", tie_embeddings=False))
    assert model.lm_head.weight is not model.embed.weight


def test_saved_configs_keep_the_behaviour_they_were_saved_with():
    """A config saved before memory.ema_momentum existed builds the free-theta memory it was trained with; a config
    saved now comes back unchanged; a missing memory section is an old one too."""
    old = MnemosConfig(**SMALL, variant="lmm").to_dict()
    del old["memory"]["ema_momentum"]
    assert MnemosConfig.from_dict(saved_model_config(old)).memory.ema_momentum is False
    assert MnemosConfig.from_dict(old).memory.ema_momentum is True  # what it would silently have become
    new = MnemosConfig(**SMALL, variant="lmm").to_dict()
    assert saved_model_config(new) == new
    assert saved_model_config({"variant": "lmm"})["memory"] == {"ema_momentum": False, "max_chunk_lr": None,
                                                                 "value_norm": False, "normalize_step": False,
                                                                 "qk_init": "random", "momentum_clock": False}
    older = MnemosConfig(**SMALL, variant="lmm").to_dict()  # saved before the chunk bound and value norm existed
    del older["memory"]["max_chunk_lr"], older["memory"]["value_norm"], older["memory"]["normalize_step"]
    memory = MnemosConfig.from_dict(saved_model_config(older)).memory
    assert (memory.max_chunk_lr, memory.value_norm) == (None, False)
    # saved with step_bound, which max_chunk_lr replaced: "chunk" bounded the chunk's sum by max_lr, "token" nothing
    for bound, expected in (("chunk", 0.8), ("token", None)):
        mid = MnemosConfig(**SMALL, variant="lmm", memory={"max_lr": 0.8}).to_dict()
        del mid["memory"]["max_chunk_lr"]
        mid["memory"]["step_bound"] = bound
        memory = MnemosConfig.from_dict(saved_model_config(mid)).memory
        assert (memory.max_lr, memory.max_chunk_lr) == (0.8, expected)
    with pytest.raises(ValueError, match="unknown MemoryConfig keys.*step_bound"):  # in a config a user writes
        MnemosConfig(**SMALL, variant="lmm", memory={"step_bound": "chunk"})
    # saved before MAL's memory had its own residual: it reached the stream only through the attention
    mal = MnemosConfig(**SMALL, variant="mal").to_dict()
    del mal["mal_memory_residual"]
    assert MnemosConfig.from_dict(saved_model_config(mal)).mal_memory_residual is False
    assert MnemosConfig.from_dict(mal).mal_memory_residual is True  # what it would silently have become
    # saved before MAC's memory was written with the mixer's input: the paper's form, written with the attention output
    mac = MnemosConfig(**SMALL, variant="mac").to_dict()
    del mac["mac_memory_residual"]
    assert MnemosConfig.from_dict(saved_model_config(mac)).mac_memory_residual is False
    assert MnemosConfig.from_dict(mac).mac_memory_residual is True
    # saved before MAC's attention started at zero: its training config, re-run, starts as it did (init only: a
    # checkpoint's weights override it either way)
    del mac["mac_attn_init_scale"]
    assert MnemosConfig.from_dict(saved_model_config(mac)).mac_attn_init_scale == 1.0
    assert MnemosConfig.from_dict(mac).mac_attn_init_scale == 0.0


@pytest.mark.parametrize("field, bad", [("depth", 0), ("expansion", 0), ("chunk_size", 0), ("conv_size", 0),
                                        ("max_lr", -0.1), ("max_chunk_lr", 0.0)])
def test_memory_checks_live_in_one_place(field, bad):
    """The memory's range checks are the layer's (MemorySettings): its keyword form and a model config reject a bad
    value with one message, prefixed ``model.memory.`` (the key as an override names it) in the config."""
    with pytest.raises(ValueError) as by_layer:
        NeuralMemory(12, **{field: bad})
    with pytest.raises(ValueError) as by_config:
        MnemosConfig(**SMALL, memory={field: bad})
    assert str(by_config.value) == f"model.memory.{by_layer.value}"
    assert str(by_layer.value).startswith(f"{field} must be")


def test_layers_take_the_memory_config_whole(monkeypatch):
    """A model's memory layers take ``config.memory`` as it is (the registry passes it; nothing is checked again),
    and build the layer the keyword form builds."""
    checks = []
    check = MemorySettings.__post_init__
    monkeypatch.setattr(MemorySettings, "__post_init__", lambda self: (checks.append(1), check(self))[1])
    cfg = MnemosConfig(**SMALL, variant="mac", segment_len=8, memory={"depth": 1, "chunk_size": 8, "max_lr": 0.3})
    assert len(checks) == 1 and isinstance(cfg.memory, MemorySettings)
    model = MnemosLM(cfg)
    assert len(checks) == 1  # building the model checked nothing twice
    names = [f.name for f in dataclasses.fields(MemorySettings)]
    for block in model.blocks:
        assert {n: getattr(block.mixer.memory, n) for n in names} == dataclasses.asdict(cfg.memory)
    by_config = NeuralMemory(32, 4, config=cfg.memory)
    by_keywords = NeuralMemory(32, 4, depth=1, chunk_size=8, max_lr=0.3)
    assert {n: getattr(by_config, n) for n in names} == {n: getattr(by_keywords, n) for n in names}
    assert by_config.token_lr == by_keywords.token_lr == 0.125  # max_chunk_lr 1.0 over a chunk of 8
    assert {k: v.shape for k, v in by_config.state_dict().items()} == \
        {k: v.shape for k, v in by_keywords.state_dict().items()}
    with pytest.raises(TypeError, match="not both"):
        NeuralMemory(32, 4, config=cfg.memory, depth=2)
    with pytest.raises(TypeError, match="config must be a MemorySettings"):
        NeuralMemory(32, 4, config=cfg.memory.to_dict())


def test_memory_impl_takes_every_choice_of_the_op():
    """memory.impl accepts what mnemos.ops.neural_memory accepts (triton included: where the kernels cannot run the
    call, the forward says why, naming impl); anything else is refused when the config is built."""
    for impl in ("auto", "triton", "torch", "reference"):
        assert MnemosConfig(**SMALL, variant="lmm", memory={"impl": impl}).memory.impl == impl
    with pytest.raises(ValueError, match="memory.impl"):
        MnemosConfig(**SMALL, variant="lmm", memory={"impl": "cuda"})
    model = MnemosLM(MnemosConfig(**SMALL, variant="lmm", memory={"impl": "triton"}))
    if not torch.cuda.is_available():  # the kernels cannot run this call here (no GPU)
        with pytest.raises(ValueError, match="impl='triton' cannot run this call"):
            model(torch.zeros(1, 5, dtype=torch.long))
