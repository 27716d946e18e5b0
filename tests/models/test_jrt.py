"""JRT-RNN's prefix linear attention (variant ``jrt_rnn``, mnemos.models.jrt), beyond the registry's invariant harness
(which runs it at the default one-token prefix):

- an empty prefix is BASED's causal linear attention exactly (the op and the ``based`` layer, float64);
- the layer is the paper's formula (an explicit quadratic loop over the features), for prefixes shorter than, equal
  to and longer than the call;
- the prefix is non-causal (an output inside it changes when a later prefix token changes), the rest is causal;
- streaming: any cut at or after the prefix equals one call (pieces, token by token after a prefill, generate); a call
  that ends inside the prefix sees the prefix tokens given so far; the cache round-trips mid-prefix;
- Hugging Face save / load and bit-exact resume of a training run keep ``based.prefix_len``.
"""

from __future__ import annotations

import io

import pytest
import torch

from mnemos.models import MnemosConfig, MnemosLM
from mnemos.models.based import BasedLinearAttention
from mnemos.models.jrt import JRTState, PrefixLinearAttention, prefix_linear_attention
from mnemos.ops.based import based_linear_attention, taylor_feature_map
from model_helpers import close, random_ids

F64 = torch.float64
V = 32
M = 6  # the prefix of the model-level tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model(prefix_len: int = M, seed: int = 0, n_layers: int = 2) -> MnemosLM:
    torch.manual_seed(seed)
    cfg = MnemosConfig(variant="jrt_rnn", vocab_size=V, d_model=16, n_layers=n_layers, n_heads=2, init_std=0.5,
                       based={"feature_dim": 4, "chunk_size": 4, "prefix_len": prefix_len})
    return MnemosLM(cfg).to(F64).eval()


def ids_of(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_ids(V, B, T, seed)


def explicit_pla(q, k, v, k_enc, v_enc, eps=1e-12):
    """y_i = phi(q_i)^T (S_enc + sum_{j<=i} v_j phi(k_j)^T) / (phi(q_i) . (z_enc + sum_{j<=i} phi(k_j)) + eps), one
    position at a time from the explicit features (the spec's formula)."""
    pq, pk, pe = taylor_feature_map(q), taylor_feature_map(k), taylor_feature_map(k_enc)  # [B, T|M, H, D]
    S_enc = torch.einsum("bmhv,bmhd->bhvd", v_enc, pe)
    z_enc = pe.sum(1)
    ys = []
    for i in range(q.shape[1]):
        S = S_enc + torch.einsum("bjhv,bjhd->bhvd", v[:, : i + 1], pk[:, : i + 1])
        z = z_enc + pk[:, : i + 1].sum(1)
        num = torch.einsum("bhvd,bhd->bhv", S, pq[:, i])
        den = (z * pq[:, i]).sum(-1, keepdim=True)
        ys.append(num / (den + eps))
    return torch.stack(ys, 1)


def test_empty_prefix_is_causal_linear_attention():
    """M = 0: the op is BASED's causal linear attention op, and the layer the ``based`` layer with the same weights
    (the encoder projections then read nothing), to float64 rounding."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 11, 3, 4, dtype=F64, generator=g), torch.randn(2, 11, 3, 4, dtype=F64, generator=g)
    v = torch.randn(2, 11, 3, 5, dtype=F64, generator=g)
    empty_k, empty_v = q[:, :0], v[:, :0]
    y, (kv, ks) = prefix_linear_attention(q, k, v, empty_k, empty_v, chunk_size=4)
    y_ref, (kv_ref, ks_ref) = based_linear_attention(q, k, v, chunk_size=4, output_final_state=True)
    close("op output", y_ref, y, 1e-12)
    close("op state kv", kv_ref, kv, 1e-12)
    close("op state k_sum", ks_ref, ks, 1e-12)

    torch.manual_seed(0)
    pla = PrefixLinearAttention(12, 3, feature_dim=4, prefix_len=0, chunk_size=4).to(F64)
    based = BasedLinearAttention(12, 3, feature_dim=4, chunk_size=4).to(F64)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(based, name).weight.data.copy_(getattr(pla, name).weight.data)
    x = torch.randn(2, 13, 12, dtype=F64, generator=g)
    y_pla, s_pla = pla(x, pla.init_state(2))
    y_based, s_based = based(x, based.init_state(2))
    close("layer output", y_based, y_pla, 1e-12)
    close("layer state", s_based.kv, s_pla.kv, 1e-12)
    assert s_pla.position == 13


@pytest.mark.parametrize("prefix_len", [1, 5, 9, 20])
def test_layer_is_the_papers_formula(prefix_len):
    """Against the explicit loop: every output sees the encoder sums of min(M, T) tokens plus its causal sums; the
    chunked op and its token-by-token reference agree."""
    torch.manual_seed(1)
    T = 9
    layer = PrefixLinearAttention(8, 2, feature_dim=3, prefix_len=prefix_len, chunk_size=4).to(F64)
    x = torch.randn(2, T, 8, dtype=F64)
    B, H, Fd, Dv = 2, 2, 3, 4
    q = layer.q_proj(x).view(B, T, H, Fd)
    k = layer.k_proj(x).view(B, T, H, Fd)
    v = layer.v_proj(x).view(B, T, H, Dv)
    m = min(prefix_len, T)
    k_e = layer.k_enc_proj(x[:, :m]).view(B, m, H, Fd)
    v_e = layer.v_enc_proj(x[:, :m]).view(B, m, H, Dv)
    ref = layer.out_proj(explicit_pla(q, k, v, k_e, v_e).reshape(B, T, H * Dv))
    with torch.no_grad():
        y, state = layer(x)
        layer.impl = "reference"
        y_loop, _ = layer(x)
    close("chunked vs formula", ref, y, 1e-12)
    close("reference vs formula", ref, y_loop, 1e-12)
    assert isinstance(state, JRTState) and state.position == T


def test_prefix_is_non_causal_and_the_rest_causal():
    """Model level (2 blocks, M = 6, T = 14): changing prefix token 4 changes the outputs at 0..3 too; changing token
    j >= M leaves every output before j unchanged (exactly) and changes the one at j."""
    lm, ids = model(), ids_of(2, 14)
    with torch.no_grad():
        ref, _ = lm(ids)
        inside = ids.clone()
        inside[:, 4] = (inside[:, 4] + 1) % V
        out, _ = lm(inside)
        for t in range(4):
            assert (out[:, t] - ref[:, t]).abs().max() > 1e-6, f"prefix token 4 did not reach the output at {t}"
        for cut in (M, 7, 10, 13):
            changed = ids.clone()
            changed[:, cut:] = (changed[:, cut:] + 1 + torch.arange(14 - cut)) % V
            out, _ = lm(changed)
            close(f"outputs before {cut}", ref[:, :cut], out[:, :cut], 0.0)
            assert (out[:, cut] - ref[:, cut]).abs().max() > 1e-6, f"token {cut} changed nothing"
        # the encoder term is a sum: a model whose prefix is one token is causal from the start
        one, ids1 = model(prefix_len=1), ids.clone()
        a, _ = one(ids1)
        ids1[:, 1] = (ids1[:, 1] + 1) % V
        b, _ = one(ids1)
        close("one-token prefix: output 0", a[:, :1], b[:, :1], 0.0)


def test_streaming_after_the_prefix_equals_one_call():
    lm, ids = model(), ids_of(2, 17)
    with torch.no_grad():
        full, _ = lm(ids)
        # pieces cut at or after the prefix
        for cuts in ([M, 7, 11], [9], [M + 1, M + 2, 16]):
            cache, outs = lm.init_cache(2), []
            for a, b in zip([0] + cuts, cuts + [17], strict=True):
                logits, cache = lm(ids[:, a:b], cache)
                outs.append(logits)
            close(f"pieces {cuts}", full, torch.cat(outs, 1))
            assert cache.position == 17 and all(s.position == 17 for s in cache.layers)
        # a prefill of the prefix, then token by token
        logits, cache = lm(ids[:, :M], lm.init_cache(2))
        steps = [logits]
        for t in range(M, 17):
            logits, cache = lm(ids[:, t : t + 1], cache)
            steps.append(logits)
        close("prefill + decoding", full, torch.cat(steps, 1))
        # generate from a prompt holding the prefix: each new token is the argmax of one forward
        out = lm.generate(ids[:, :8], 5)
        again, _ = lm(out)
        assert torch.equal(out[:, 8:], again[:, 7:-1].argmax(-1))
    # a call ending inside the prefix sees the prefix so far: in one block, token t of a stream fed one token at a
    # time is token t of a forward over the first t + 1 tokens (whose prefix is all of them), for t < M (in a stack,
    # the later blocks' causal sums also hold the earlier blocks' outputs as they were when streamed)
    one, cache = model(n_layers=1), None
    with torch.no_grad():
        cache, steps = one.init_cache(2), []
        for t in range(M):
            step, cache = one(ids[:, t : t + 1], cache)
            alone, _ = one(ids[:, : t + 1])
            close(f"token {t} inside the prefix", alone[:, -1:], step)
            steps.append(step)
        whole, _ = one(ids)
    close("the last prefix token streamed sees the whole prefix", whole[:, M - 1 : M], steps[-1])
    assert (steps[2] - whole[:, 2:3]).abs().max() > 1e-6  # token 2 streamed did not see the prefix tokens 3 .. M - 1


def test_cache_round_trip_mid_prefix():
    lm, ids = model(), ids_of(2, 12)
    with torch.no_grad():
        first, cache = lm(ids[:, :3], lm.init_cache(2))
        buf = io.BytesIO()
        torch.save(cache.state_dict(), buf)
        buf.seek(0)
        restored = lm.init_cache(2)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        assert [s.position for s in restored.layers] == [3, 3]
        a, _ = lm(ids[:, 3:], restored)
        b, _ = lm(ids[:, 3:], cache)
    close("restored continuation", b, a, 0.0)


def test_config_and_registry():
    cfg = MnemosConfig(variant="jrt_rnn", vocab_size=V, d_model=16, n_heads=2, based={"prefix_len": 0})
    assert MnemosConfig.from_dict(cfg.to_dict()) == cfg and cfg.based.prefix_len == 0
    assert cfg.reads_field("based.prefix_len") and cfg.reads_field("based.feature_dim")
    assert not cfg.reads_field("based.chunk_size")  # how, not what
    assert not MnemosConfig(variant="based", vocab_size=V).reads_field("based.prefix_len")
    with pytest.raises(ValueError, match="model.based.prefix_len must be >= 0"):
        MnemosConfig(variant="jrt_rnn", based={"prefix_len": -1})
    layer = MnemosLM(MnemosConfig(variant="jrt_rnn", vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                                  based={"feature_dim": 4})).blocks[0].mixer
    assert layer.state_numel() == (16 + 2) * (1 + 4 + 16)  # (d + H) D_phi


def test_hugging_face_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mnemos.models.hf import MnemosForCausalLM, MnemosHFConfig

    torch.manual_seed(0)
    hf = MnemosForCausalLM(MnemosHFConfig(variant="jrt_rnn", vocab_size=V, d_model=16, n_layers=2, n_heads=2,
                                          based={"feature_dim": 4, "prefix_len": 5})).eval()
    hf.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.to_mnemos().based.prefix_len == 5
    ids = ids_of(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_resume_is_bit_exact(tmp_path):
    from mnemos.train.config import load_config
    from mnemos.train.loop import train

    args = ["model.variant=jrt_rnn", "model.vocab_size=64", "model.d_model=16", "model.n_layers=1",
            "model.n_heads=2", "model.based.feature_dim=4", "model.based.prefix_len=8", "task.vocab_size=64",
            "task.seq_len=32", "task.num_kv_pairs=4", "task.train_examples=64", "task.eval_examples=8",
            "run.batch_size=4", "run.eval_every=1000", "run.progress=false", "optim.warmup_steps=1", "run.steps=4"]

    def cfg(where, *extra):
        return load_config(None, args + [f"run.out_dir={where}", *extra])

    full = train(cfg(tmp_path / "full"))
    first = train(cfg(tmp_path / "cut", "run.stop_after=2"))
    assert first.train_losses == full.train_losses[:2]
    rest = train(cfg(tmp_path / "cut"), resume=True)
    assert rest.train_losses == full.train_losses[2:]
    with pytest.raises(ValueError, match=r"model.based.prefix_len"):
        train(cfg(tmp_path / "cut", "model.based.prefix_len=4"), resume=True)


@pytest.mark.parametrize("cls", [BasedLinearAttention, PrefixLinearAttention])
@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=32, heads=3), r"heads \(3\) must divide dim \(32\)"),
    (dict(dim=32, heads=4, feature_dim=0), r"feature_dim must be an int >= 1, got 0"),
    (dict(dim=32, heads=4, chunk_size=True), r"chunk_size must be an int >= 1, got True"),
    (dict(dim=32.0, heads=4), r"dim must be an int >= 1, got 32.0"),
    (dict(dim=32, heads=4, impl="fast"), r"impl must be 'chunked' or 'reference', got 'fast'"),
])
def test_feature_attention_layers_name_a_bad_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_prefix_len_may_be_zero_but_not_negative():
    assert PrefixLinearAttention(32, 4, prefix_len=0).prefix_len == 0
    with pytest.raises(ValueError, match=r"prefix_len must be an int >= 0, got -1"):
        PrefixLinearAttention(32, 4, prefix_len=-1)
