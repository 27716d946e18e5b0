"""The variant registry: every registered variant, a toy one registered here included, passes the invariants, and
each entry's claims (its state type, whether the state grows, which config fields it reads) are measured.

The invariants, at tiny sizes in float64 (test_models.py checks the built-in variants more deeply):
generate and token-by-token decoding == one forward; a stream cut in pieces with the cache carried == one call;
changing a token leaves every earlier logit unchanged; a sequence's logits do not depend on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from mnemos.models import VARIANT_REGISTRY, VARIANTS, MnemosConfig, MnemosLM, VariantSpec, variant_spec
from mnemos.models.config import variant_reads

V, T = 32, 12
# window 4 and segment 5 are exceeded by T; the memory's chunk of 3 divides neither
TINY = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, window=4, segment_len=5, num_persistent=2, init_std=0.5,
            memory=dict(depth=2, expansion=2, chunk_size=3), mac_attn_init_scale=1.0)  # MAC's attention in play


@dataclass
class EMAState:
    h: Tensor  # [B, d]


class EMAMixer(nn.Module):
    """A toy variant: ``h_t = a h_{t-1} + (1 - a) x_t``, ``y_t = W h_t`` (what a new variant needs, and no more)."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.a = 0.7

    def init_state(self, batch: int, device=None, dtype=None) -> EMAState:
        return EMAState(torch.zeros(batch, self.proj.in_features, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: EMAState | None = None) -> tuple[Tensor, EMAState | None]:
        h = torch.zeros_like(x[:, 0]) if state is None else state.h
        hs = []
        for t in range(x.shape[1]):
            h = self.a * h + (1 - self.a) * x[:, t]
            hs.append(h)
        return self.proj(torch.stack(hs, 1)), None if state is None else EMAState(h)


TOY = VariantSpec("toy_ema", "baseline", lambda c: EMAMixer(c.d_model), EMAState, "constant", ())


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    monkeypatch.setitem(VARIANT_REGISTRY, TOY.name, TOY)


def make(variant: str, seed: int = 0, **fields) -> MnemosLM:
    memory = {**TINY["memory"], **fields.pop("memory", {})}
    torch.manual_seed(seed)
    return MnemosLM(MnemosConfig.from_dict({**TINY, "variant": variant, **fields, "memory": memory})).double().eval()


def ids_of(B: int, n: int, seed: int = 1) -> Tensor:
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def close(name: str, ref: Tensor, out: Tensor, tol: float = 1e-9) -> None:
    err = (ref - out).abs().max().item()
    assert err <= tol, f"{name}: max |ref - out| = {err:.3e} > {tol:.0e}"


def test_the_config_accepts_exactly_the_registered_variants():
    assert VARIANTS == tuple(n for n in VARIANT_REGISTRY if n != TOY.name)
    assert MnemosConfig(variant="toy_ema", vocab_size=V).variant == "toy_ema"
    with pytest.raises(ValueError, match="unknown variant 'titan'.*toy_ema"):
        MnemosConfig(variant="titan")


@pytest.mark.parametrize("variant", [*VARIANTS, TOY.name])
def test_every_registered_variant_keeps_the_invariants(variant):
    model, ids = make(variant), ids_of(3, T)
    spec = variant_spec(variant)
    with torch.no_grad():
        full, _ = model(ids)  # [B, T, V]
        # token by token
        cache, steps = model.init_cache(3), []
        for t in range(T):
            logits, cache = model(ids[:, t : t + 1], cache)
            steps.append(logits)
        close(f"{variant} token by token", full, torch.cat(steps, 1))
        assert all(type(s) is spec.state for s in cache.layers), f"{variant}: state is not {spec.state.__name__}"
        # generate: each new token is the argmax of one forward over the sequence so far
        out = model.generate(ids[:, :5], T - 5)
        again, _ = model(out)
        assert torch.equal(out[:, 5:], again[:, 4:-1].argmax(-1)), f"{variant}: generate != forward's argmax"
        # pieces, the cache carried
        cache, pieces = model.init_cache(3), []
        for a, b in zip((0, 1, 5, 6), (1, 5, 6, T), strict=True):
            logits, cache = model(ids[:, a:b], cache)
            pieces.append(logits)
        close(f"{variant} pieces", full, torch.cat(pieces, 1))
        # causality
        for cut in (1, 5, 9):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 1) % V
            out, _ = model(changed)
            close(f"{variant} logits before {cut}", full[:, :cut], out[:, :cut], 1e-12)
            assert (full[:, cut] - out[:, cut]).abs().max() > 1e-6, f"{variant}: token {cut} changed nothing"
        # batch independence
        for i in range(3):
            close(f"{variant} sample {i} alone", full[i : i + 1], model(ids[i : i + 1])[0], 1e-12)


@pytest.mark.parametrize("variant", [*VARIANTS, TOY.name])
def test_state_growth_is_what_the_registry_says(variant):
    model = make(variant)
    sizes = []
    with torch.no_grad():
        for n in (2 * T, 4 * T):
            _, cache = model(ids_of(1, n), model.init_cache(1))
            sizes.append(cache.num_elements())
    assert model.state_growth == variant_spec(variant).state_growth
    assert (sizes[1] > sizes[0]) == (model.state_growth == "growing"), f"{variant}: state sizes {sizes}"


# a changed value of each field; memory.impl picks an implementation of the same numbers, so it is left out
CHANGES = {"window": 3, "segment_len": 4, "num_persistent": 1, "rope_base": 500.0, "mag_gate_bias": 1.0,
           "mal_memory_residual": False, "mac_memory_residual": False, "mac_attn_init_scale": 0.5, "memory.max_lr": 0.1, "memory.chunk_size": 2, "memory.conv_size": 2, "memory.depth": 1}


@pytest.mark.parametrize("variant", [*VARIANTS, TOY.name])
def test_a_variant_reads_exactly_the_fields_its_entry_names(variant):
    ids = ids_of(2, T)
    with torch.no_grad():
        ref, _ = make(variant)(ids)
        for key, value in CHANGES.items():
            section, _, leaf = key.rpartition(".")
            fields = {"memory": {leaf: value}} if section else {key: value}
            out, _ = make(variant, **fields)(ids)
            differs = out.shape != ref.shape or not torch.equal(out, ref)
            assert differs == variant_reads(variant, key), (
                f"{variant}: changing {key} {'changed' if differs else 'left'} the logits "
                f"{'' if differs else 'un'}changed, but its entry says it {'reads' if variant_reads(variant, key) else 'ignores'} it")
