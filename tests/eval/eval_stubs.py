"""Tiny models for the harness tests: an oracle that cheats, a context-blind constant model, and two small torch
models with MnemosLM's signature, one with a constant recurrent state and one with a growing KV cache."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnemos.data import IGNORE_INDEX
from mnemos.eval import StatefulLM


class AnswerKeyLM(StatefulLM):
    """Cheats: it was built with the answers. Its state keeps every token it has read.

    MQAR: ``answers`` maps a sample's context (its first 2K tokens) to its label row; at a labelled position it
    predicts the label. Text tasks: ``answers`` maps a prompt's token ids to its answer; right after the whole
    prompt it spells " answer" then a newline.
    """

    def __init__(self, vocab_size: int, *, mqar: tuple[Tensor, Tensor, int] | None = None,
                 prompts: dict[tuple[int, ...], str] | None = None):
        self.name, self.vocab_size, self.state_growth = "oracle", vocab_size, "growing"
        self.mqar = None
        if mqar is not None:
            inputs, labels, K = mqar
            self.prefix = 2 * K
            self.mqar = {tuple(x[: self.prefix].tolist()): y.tolist() for x, y in zip(inputs, labels, strict=True)}
        self.prompts = prompts or {}
        self.prompt_lengths = {len(p) for p in self.prompts}

    def init_state(self, batch: int) -> list[dict[str, Any]]:
        return [{"seen": [], "labels": None, "out": None, "start": 0} for _ in range(batch)]

    def forward(self, ids: Tensor, state: list[dict[str, Any]]) -> tuple[Tensor, Any]:
        B, T = ids.shape
        preds = torch.zeros(B, T, dtype=torch.int64)
        for b, row in enumerate(state):
            for t, x in enumerate(ids[b].tolist()):
                row["seen"].append(x)
                n = len(row["seen"])
                if self.mqar is not None:
                    if n == self.prefix:
                        row["labels"] = self.mqar[tuple(row["seen"])]
                    if row["labels"] is not None and row["labels"][n - 1] != IGNORE_INDEX:
                        preds[b, t] = row["labels"][n - 1]
                    continue
                if n in self.prompt_lengths and tuple(row["seen"]) in self.prompts:
                    row["out"] = list((" " + self.prompts[tuple(row["seen"])] + "\n").encode())
                    row["start"] = n
                if row["out"] is not None:
                    k = n - row["start"]
                    preds[b, t] = row["out"][k] if k < len(row["out"]) else ord("\n")
        return F.one_hot(preds, self.vocab_size).float(), state


class ConstantLM(StatefulLM):
    """Context-blind: the prediction is ``table.get(current token, default)``; no state at all."""

    def __init__(self, vocab_size: int, default: int, table: dict[int, int] | None = None):
        self.name, self.vocab_size, self.state_growth = "constant", vocab_size, "constant"
        lookup = torch.full((vocab_size,), default, dtype=torch.int64)
        for k, v in (table or {}).items():
            lookup[k] = v
        self.lookup = lookup

    def init_state(self, batch: int) -> None:
        return None

    def forward(self, ids: Tensor, state: None) -> tuple[Tensor, None]:
        return F.one_hot(self.lookup[ids], self.vocab_size).float(), state


def spelling_table(text: str, after: str) -> dict[int, int]:
    """A bigram table that, after the byte ``after``, spells ``text`` (whose bytes must not repeat)."""
    seq = [ord(after)] + list(text.encode())
    if len(set(seq[:-1])) != len(seq) - 1:
        raise ValueError("bytes repeat, a bigram table cannot spell that")
    return dict(zip(seq[:-1], seq[1:], strict=True))


class TinyRecurrentLM(nn.Module):
    """``h_t = a * h_{t-1} + E[x_t]``, ``logits_t = tanh(h_t) @ W``; float64; constant state ``[B, D]``.

    MnemosLM's signature: ``forward(input_ids, cache=None) -> (logits, cache)``, ``init_cache(batch, device,
    dtype)``. Internally it scans in blocks of 16 tokens in closed form, so how a caller splits the sequence
    changes only the rounding.
    """

    def __init__(self, vocab_size: int, dim: int = 8, seed: int = 0, variant: str = "lmm"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=vocab_size, variant=variant)
        self.emb = nn.Parameter(torch.randn(vocab_size, dim, generator=g, dtype=torch.float64))
        self.log_a = nn.Parameter(torch.log(torch.linspace(0.5, 0.99, dim, dtype=torch.float64)))
        self.out = nn.Parameter(torch.randn(dim, vocab_size, generator=g, dtype=torch.float64))

    def init_cache(self, batch: int, device=None, dtype=None) -> dict[str, Tensor]:
        return {"h": torch.zeros(batch, self.emb.shape[1], dtype=torch.float64, device=device)}

    def forward(self, input_ids: Tensor, cache: dict[str, Tensor] | None = None):
        cache = cache if cache is not None else self.init_cache(input_ids.shape[0])
        e = self.emb[input_ids]  # [B, T, D]
        h = cache["h"]  # [B, D]
        outs = []
        for s in range(0, e.shape[1], 16):
            blk = e[:, s : s + 16]  # [B, c, D]
            c = blk.shape[1]
            i = torch.arange(c, dtype=torch.float64)
            gap = (i[:, None] - i[None, :]).clamp(min=0)  # [c, c]
            w = torch.exp(gap[..., None] * self.log_a) * (i[:, None] >= i[None, :])[..., None]  # [c, c, D]
            hs = torch.einsum("ijd,bjd->bid", w, blk) + torch.exp((i[:, None] + 1) * self.log_a) * h[:, None]
            outs.append(hs)
            h = hs[:, -1].clone()  # not a view: the state must not pin the block's storage
        hs = torch.cat(outs, dim=1)  # [B, T, D]
        return torch.tanh(hs) @ self.out, {"h": h}


class TinyAttentionLM(nn.Module):
    """One head of causal softmax attention over embeddings, float64, with a KV cache that grows: ``{"k", "v":
    [B, S, D]}``. ``config.max_context`` is its hard limit (None: none); variant "transformer"."""

    def __init__(self, vocab_size: int, dim: int = 8, seed: int = 0, max_context: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=vocab_size, variant="transformer", max_context=max_context)
        self.emb = nn.Parameter(torch.randn(vocab_size, dim, generator=g, dtype=torch.float64))
        self.qkv = nn.Parameter(torch.randn(3, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim))
        self.out = nn.Parameter(torch.randn(dim, vocab_size, generator=g, dtype=torch.float64))

    def init_cache(self, batch: int, device=None, dtype=None) -> dict[str, Tensor]:
        empty = torch.zeros(batch, 0, self.emb.shape[1], dtype=torch.float64, device=device)
        return {"k": empty, "v": empty.clone()}

    def forward(self, input_ids: Tensor, cache: dict[str, Tensor] | None = None):
        cache = cache if cache is not None else self.init_cache(input_ids.shape[0])
        x = self.emb[input_ids]  # [B, T, D]
        q, k, v = (x @ w for w in self.qkv)  # [B, T, D] each
        k_all = torch.cat([cache["k"], k], dim=1)  # [B, S + T, D]
        v_all = torch.cat([cache["v"], v], dim=1)
        T, S = x.shape[1], cache["k"].shape[1]
        visible = torch.arange(S + T)[None, :] <= (S + torch.arange(T))[:, None]  # [T, S + T]
        scores = (q @ k_all.transpose(1, 2)) / math.sqrt(x.shape[-1])  # [B, T, S + T]
        y = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v_all  # [B, T, D]
        return (x + y) @ self.out, {"k": k_all, "v": v_all}


class FakeHFOutput(SimpleNamespace):
    pass


class FakeHFCausalLM(nn.Module):
    """The bits of a Hugging Face causal LM the adapter uses: ``config`` and ``forward(input_ids,
    past_key_values, use_cache) -> .logits, .past_key_values``; attention inside (TinyAttentionLM)."""

    def __init__(self, vocab_size: int, max_position_embeddings: int):
        super().__init__()
        self.inner = TinyAttentionLM(vocab_size)
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                      model_type="fake", name_or_path="fake-hf")

    def forward(self, input_ids: Tensor, past_key_values=None, use_cache: bool = True):
        assert use_cache
        logits, cache = self.inner(input_ids, past_key_values)
        return FakeHFOutput(logits=logits, past_key_values=cache)


class FakeHFTokenizer:
    """Bytes, plus a BOS (id 256) that ``add_special_tokens=True`` prepends; ``decode`` drops it."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, None

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([256] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")
