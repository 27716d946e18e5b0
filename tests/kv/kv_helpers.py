"""Shared helpers of the KV-policy tests: tiny models and a chunked stream."""

from __future__ import annotations

import torch

from mnemos.models import MnemosConfig, MnemosLM

F64 = torch.float64
V = 64
# window 5 < every context below; two persistent tokens in MAG / MAL's attention
TINY = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, window=5, segment_len=6, num_persistent=2,
            init_std=0.5, memory=dict(depth=2, expansion=2, chunk_size=4))
ATTENTION_VARIANTS = ["transformer", "swa", "mag", "mal"]


def make_model(variant: str, seed: int = 0, **overrides) -> MnemosLM:
    torch.manual_seed(seed)
    return MnemosLM(MnemosConfig.from_dict({**TINY, "variant": variant, **overrides})).to(F64).eval()


def ids_of(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stream(model: MnemosLM, ids: torch.Tensor, pieces: list[int], cache=None, on_call=None):
    """Feed ``ids`` in ``pieces`` with the cache carried; returns (logits of every call concatenated, cache)."""
    cache = model.init_cache(ids.shape[0]) if cache is None else cache
    outs, s = [], 0
    for n in pieces:
        out, cache = model(ids[:, s : s + n], cache)
        outs.append(out)
        s += n
        if on_call is not None:
            on_call(cache)
    assert s == ids.shape[1]
    return torch.cat(outs, dim=1), cache


def attn_caches(cache) -> list:
    """The KV caches of a model cache, in layer order (a MAG / MAL state holds its cache in ``.attn``)."""
    return [getattr(layer, "attn", layer) for layer in cache.layers]


HF_ARCHS = ("llama", "qwen2", "mistral")  # the Llama-family causal LMs the KV policies' HF hook serves


def tiny_llama(vocab: int = V, *, layers: int = 2, seed: int | None = 0, dtype=None, arch: str = "llama", **config):
    """A random-init Hugging Face Llama-family causal LM of the KV tests (``arch`` in :data:`HF_ARCHS`; hidden 32, 4
    query heads over 2 KV heads: GQA), in eval mode; ``seed`` None keeps the global RNG as it is; ``config``: more
    config fields."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    cfg = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **config)
    model = model_cls(cfg)
    return (model if dtype is None else model.to(dtype)).eval()
