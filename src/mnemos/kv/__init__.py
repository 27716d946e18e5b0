"""KV-cache policies for attention's short-term memory: eviction (StreamingLLM, H2O, SnapKV, PyramidKV, L2-norm,
Scissorhands, D2O with merging), per-head budgets (DuoAttention / RazorAttention-style), key-channel pruning (ThinK),
packed quantisation (KIVI), cross-layer merging of adjacent deep layers (MiniCache), eviction + KIVI (``compose``)
and a retrieval tier with an offload store (InfLLM, SentenceKV), on every ``mnemos.layers.Attention``; policies by
name (``parse_policy_spec``: the ``--kv-policy`` grammar).

``with SnapKV(budget=256)(model): model.generate(...)`` or ``apply_kv_policy(model, policy)``; Hugging Face
Llama-family models through ``mnemos.kv.hf`` (imported on its own: it needs transformers). The contract and each
policy's algorithm are in docs/KV.md.
"""

from .base import (
    Bytes,
    EvictingKVCache,
    EvictionContext,
    EvictionPolicy,
    Policy,
    apply_kv_policy,
    attention_layers,
    attention_probs,
    use_kv_policy,
)
from .eviction import H2O, L2Norm, PyramidKV, SnapKV, StreamingLLM, pyramid_budgets, snapkv_scores
from .kivi import KIVI, KIVICache, dequantize, pack, quantize, unpack
from .minicache import MiniCache, MiniCacheLower, MiniCacheUpper, merge_pair, slerp
from .think import ThinK, ThinKCache, think_channel_scores
from .compose import Composed, ComposedCache, ThinKComposedCache, compose
from .d2o import D2O, layer_budgets, merge_evicted
from .perhead import DuoAttention, HeadSplitCache, choose_retrieval_heads
from .retrieval import InfLLM, InfLLMCache, OffloadStore, SentenceKV, SentenceKVCache, install_token_id_hook
from .scissorhands import Scissorhands, unimportance_counts
from .spec import POLICIES, PolicySpec, parse_policy_spec, register_policy

__all__ = [
    "Bytes", "Policy", "EvictionPolicy", "EvictionContext", "EvictingKVCache", "apply_kv_policy", "use_kv_policy",
    "attention_layers", "attention_probs", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "L2Norm", "pyramid_budgets",
    "snapkv_scores", "KIVI", "KIVICache", "quantize", "dequantize", "pack", "unpack", "ThinK", "ThinKCache",
    "think_channel_scores", "Scissorhands", "unimportance_counts", "D2O", "layer_budgets", "merge_evicted",
    "DuoAttention", "HeadSplitCache", "choose_retrieval_heads", "Composed", "ComposedCache", "ThinKComposedCache",
    "compose", "POLICIES",
    "PolicySpec", "parse_policy_spec", "register_policy", "InfLLM", "InfLLMCache", "SentenceKV", "SentenceKVCache",
    "OffloadStore", "install_token_id_hook", "MiniCache", "MiniCacheLower", "MiniCacheUpper", "merge_pair", "slerp",
]
