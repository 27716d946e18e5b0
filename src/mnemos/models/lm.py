"""``MnemosLM``: embedding -> blocks (one skeleton, the mixer picked by ``config.variant``, or per block by
``config.layers`` in a hybrid stack) -> RMSNorm -> LM head.

Plain ``nn.Module``; a Hugging Face wrapper can hold one and map ``past_key_values`` to :class:`Cache`.

**Hybrid stacks** (``variant="hybrid"``, ``layers=[...]``, one registered variant per block): each block's mixer is
built by its variant's registry entry from the config as that variant's own (``variant`` set to it, ``layers`` None),
so a block reads what its variant reads and nothing else; the cache holds each block's own typed state. What the
registry says of one variant, :mod:`.registry` says of a stack (``stack_state_growth``: growing if any block's state
grows; ``stack_reach``; ``stack_reads_field``: the union of the blocks' reads).

**Auxiliary losses.** A mixer may store a training loss of its own in an ``aux_loss`` attribute at each forward (MoM's
load-balancing loss, already scaled); :meth:`MnemosLM.aux_loss` sums them over the blocks for the last call, and the
training loop adds the sum to the language-model loss.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import Tensor, nn

from ..layers import RMSNorm
from .block import Block, SwiGLU
from .cache import Cache
from .config import MnemosConfig
from .registry import HYBRID, StateGrowth, stack_state_growth, stack_variants, variant_spec

__all__ = ["MnemosLM", "build_mixer"]


def build_mixer(config: MnemosConfig, variant: str | None = None) -> nn.Module:
    """The token mixer of one block of ``variant`` (default ``config.variant``; a block's entry of ``config.layers``
    in a hybrid stack): its registry entry's builder (:mod:`.registry`), given ``config`` as that variant's own."""
    variant = config.variant if variant is None else variant
    if variant == HYBRID:
        raise ValueError(f"a hybrid stack has a variant per block (config.layers = {config.layers}): pass the "
                         f"block's variant")
    if variant != config.variant or config.layers is not None:
        config = dataclasses.replace(config, variant=variant, layers=None)
    return variant_spec(variant).build(config)


class MnemosLM(nn.Module):
    """A causal language model of any mnemos variant.

    ``forward(input_ids [B, T], cache=None) -> (logits [B, T, V], cache)``:

    - ``cache=None``: the T tokens are a whole sequence from position 0 (training); the cache returned is None unless
      ``use_cache=True``, which starts one.
    - ``cache`` from :meth:`init_cache` (or returned by an earlier call): the tokens continue the stream at
      ``cache.position``; any number per call, and the logits equal those of one pass over the whole stream. The
      cache is updated in place and returned; its position advances by T.

    Example:
        >>> cfg = MnemosConfig(variant="mal", vocab_size=64, d_model=32, n_layers=2, n_heads=4, window=8)
        >>> model = MnemosLM(cfg)
        >>> ids = torch.randint(0, 64, (2, 10))
        >>> logits, _ = model(ids)
        >>> cache = model.init_cache(2)
        >>> a, cache = model(ids[:, :7], cache)
        >>> b, cache = model(ids[:, 7:], cache)
        >>> torch.allclose(torch.cat([a, b], 1), logits, atol=1e-5), cache.position
        (True, 10)
    """

    def __init__(self, config: MnemosConfig):
        super().__init__()
        if not isinstance(config, MnemosConfig):
            raise TypeError(f"config must be a MnemosConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        norm = partial(RMSNorm, d, config.norm_eps)
        self.blocks = nn.ModuleList(
            Block(build_mixer(config, v), SwiGLU(d, config.mlp_hidden_size), norm) for v in stack_variants(config)
        )
        self.norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)

    @property
    def state_growth(self) -> StateGrowth:
        """``"growing"`` if the decoding state grows with the context (full attention's KV cache), else
        ``"constant"`` (a memory, a window or a segment: bounded whatever the length); from the variant's registry
        entry (a hybrid stack's: growing if any block's is)."""
        return stack_state_growth(self.config)

    def aux_loss(self) -> Tensor | None:
        """The sum over the blocks of the auxiliary training losses their mixers stored at the last forward call
        (``mixer.aux_loss``: MoM's load-balancing loss, scaled), to add to the language-model loss; None when no
        mixer has one (every variant but ``mom``). ``mnemos train`` adds it; it is not part of the logged loss."""
        losses = [b.mixer.aux_loss for b in self.blocks if getattr(b.mixer, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    def init_cache(self, batch: int, device=None, dtype=None) -> Cache:
        """An empty cache (position 0) for ``batch`` streams.

        ``device`` defaults to the model's; ``dtype`` (of the attention caches and conv histories: the activations')
        to the autocast dtype when autocast is on for that device, else the model's. Memory states keep their own
        dtype (float32 under half precision).
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        device = self.embed.weight.device if device is None else torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.embed.weight.dtype
        return Cache([b.init_state(batch, device, dtype) for b in self.blocks], 0, batch)

    def _check(self, input_ids: Tensor, cache: Cache | None) -> None:
        if not isinstance(input_ids, Tensor):
            raise ValueError(f"input_ids must be an int64 or int32 tensor [B, T], got {type(input_ids).__name__}")
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}"
            raise ValueError(f"input_ids must be an int64 or int32 tensor [B, T], got {got}")
        if input_ids.shape[1] < 1:
            raise ValueError("input_ids must hold at least one token per sequence")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")
        if cache is not None:
            if not isinstance(cache, Cache):
                raise TypeError(f"cache must be a Cache (see init_cache) or None, got {type(cache).__name__}")
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"cache is for batch size {cache.batch_size}, input_ids has {input_ids.shape[0]}")
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"cache has {len(cache.layers)} layer states, the model has {len(self.blocks)} blocks")

    def features(self, input_ids: Tensor, cache: Cache | None = None) -> tuple[Tensor, Cache | None]:
        """The final hidden states ``[B, T, d]`` (after the last norm, before the head) and the cache."""
        self._check(input_ids, cache)
        x = self.embed(input_ids)  # [B, T, d]
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if cache is None else cache.layers[i])
            if cache is not None:
                cache.layers[i] = state
        if cache is not None:
            cache.position += input_ids.shape[1]  # the one place the position advances
        return self.norm(x), cache

    def forward(
        self, input_ids: Tensor, cache: Cache | None = None, *, use_cache: bool = False
    ) -> tuple[Tensor, Cache | None]:
        if cache is None and use_cache:
            cache = self.init_cache(input_ids.shape[0], input_ids.device)
        h, cache = self.features(input_ids, cache)
        return self.lm_head(h), cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        greedy: bool = True,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``input_ids [B, T]`` by ``max_new_tokens``: greedy (argmax) or sampled at ``temperature``.

        Returns ``[B, T + max_new_tokens]``. The prompt is read in one call, then one token per call with the cache.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        cache = self.init_cache(input_ids.shape[0], input_ids.device)
        out = [input_ids]
        logits, cache = self(input_ids, cache)
        for i in range(max_new_tokens):
            last = logits[:, -1].float()  # [B, V]
            if not bool(torch.isfinite(last).all()):  # argmax of NaN would pick a token silently
                raise FloatingPointError(
                    f"non-finite logits after {cache.position} tokens: the model's state overflowed (a test-time "
                    "memory diverging: lower memory.max_lr, keep memory.ema_momentum on)")
            if greedy:
                nxt = last.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator).squeeze(-1)
            out.append(nxt[:, None].to(input_ids.dtype))
            if i + 1 < max_new_tokens:
                logits, cache = self(out[-1], cache)
        return torch.cat(out, dim=1)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
