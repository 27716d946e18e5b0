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

**Left-padded batches** (``attention_mask``): rows of a batch may start with pads (zeros then ones in each row of
the mask). Many variants depend on absolute positions from the start of a stream (the memory rule's chunk anchors,
MAC's segments, RoPE, persistent tokens, the sliding window and the KV cache) and a :class:`Cache` keeps one position
for all its rows, so masking the pads out would shift every padded row's chunks and segments. Instead the rows are
grouped by their number of pads, each group runs without its pads as a batch of its own, and the outputs are scattered
back into batch order (zeros at the pads); the cache is a :class:`PaddedCache`, one :class:`Cache` per group, and each
later call runs each group and scatters again. Each row is therefore computed exactly as it would be alone (up to the
float rounding of a different batch size), for every variant. Cost: one model call per group, at the prompt and at
every decoding step (G <= B groups; one when all rows have the same length). A batch without pads (no mask, or an
all-ones one) takes the plain path unchanged. Right padding or holes in a row are a ``ValueError``.

**Packed documents** (``document_ids``, training only: no cache): a row may hold several documents, each starting
from a fresh state. Each document is cut out and run as a sequence of its own from position 0 (so chunk anchors,
segments, RoPE and windows count from its first token); all documents run in one call as a right-padded batch
``[N_docs, longest document]``, which is exact because every variant is strictly causal (outputs at t do not depend
on tokens after t, an invariant the tests check), and the outputs are put back in place. Cost: one call over
``N_docs x longest`` tokens instead of ``B x T`` (the padding waste); a batch with one document per row takes the plain
path. MoM's auxiliary loss of such a call also sees the pads' routing (an approximation).

**Relay mixers** (LM2, :mod:`.lm2`: a memory bank that flows through depth and is carried from the last such block
into the first at each segment end). A mixer declares it with an int attribute ``relay_period`` (N, its segment);
every other mixer lacks it, and a stack without one takes the plain path unchanged. For a stack with relay blocks
(all of one period), :meth:`MnemosLM._run` cuts each call at the segment boundaries, multiples of N counted from
the stream's start (``cache.position``), and runs all the blocks over each piece before the next (segment-major);
this is exact for every block, since every variant gives the same outputs and state for a stream cut anywhere. The
relay mixers are called ``mixer(x, state, handed) -> (y, state, handed)`` (through ``Block.forward(x, state,
handed)``): the first one (the model sets ``relay_first`` True on it, False on the others) gets None, each later one
what the previous one handed on; the other blocks run as ever, and the value passes them by. When a piece ends a
segment, the last relay block's handed value goes to the first one's state for the next segment
(``mixer.carry(state, handed)``). A call without a cache (training) runs on a transient cache when it spans more than
one piece; MoM's auxiliary loss is then the token-weighted mean over the pieces.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import Tensor, nn

from ..layers import RMSNorm
from .block import Block, SwiGLU
from .cache import Cache, PaddedCache
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
    - ``attention_mask`` (keyword): a left-padded batch, in the first call of a stream; each row's logits equal
      those of the row alone, the logits at the pads are zeros and the cache is a :class:`PaddedCache` (the module
      docstring says how, and what it costs).
    - ``document_ids`` (keyword, training: no cache): packed rows, ``[B, T]`` integers, a new document wherever the
      id changes along a row; each document's logits equal those of the document alone (the state starts fresh at
      each boundary). The target of a document's first token (predicted from the previous document) is the caller's
      to ignore.

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
        # relay mixers (LM2; module docstring): the blocks that pass a side channel, the first of them marked
        self._relays = tuple(i for i, b in enumerate(self.blocks) if getattr(b.mixer, "relay_period", None))
        if len({self.blocks[i].mixer.relay_period for i in self._relays}) > 1:
            raise ValueError("the relay blocks of a stack (LM2) must share one segment length")
        for i in self._relays:
            self.blocks[i].mixer.relay_first = i == self._relays[0]

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

    def _check(self, input_ids: Tensor, cache: Cache | PaddedCache | None) -> None:
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
            if not isinstance(cache, (Cache, PaddedCache)):
                raise TypeError(f"cache must be a Cache (see init_cache), a PaddedCache or None, got "
                                f"{type(cache).__name__}")
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"cache is for batch size {cache.batch_size}, input_ids has {input_ids.shape[0]}")
            for sub in cache.groups if isinstance(cache, PaddedCache) else [cache]:
                if len(sub.layers) != len(self.blocks):
                    raise ValueError(f"cache has {len(sub.layers)} layer states, the model has {len(self.blocks)} "
                                     "blocks")

    def features(
        self,
        input_ids: Tensor,
        cache: Cache | PaddedCache | None = None,
        *,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> tuple[Tensor, Cache | PaddedCache | None]:
        """The final hidden states ``[B, T, d]`` (after the last norm, before the head) and the cache.

        ``attention_mask`` (optional, 0/1 or bool): ``[B, T]`` for this call's tokens, or ``[B, P + T]`` covering the
        ``P = cache.position`` columns the cache has consumed too (the Hugging Face convention). Only left padding is
        supported, and only in the first call of a stream (each row zeros, then ones; at least one real token per
        row); later calls of a padded stream take a :class:`PaddedCache` and add no pads. With pads, the hidden
        states at the pads are zeros and the cache returned is a :class:`PaddedCache` (a given fresh :class:`Cache`
        is split into it, not updated); see the module docstring for the design and its cost.

        ``document_ids`` (optional, ``[B, T]`` integers; without a cache): packed rows, a new document wherever the
        id changes from one token to the next; each document runs from a fresh state (module docstring).
        """
        self._check(input_ids, cache)
        if document_ids is not None:
            if attention_mask is not None:
                raise ValueError("pass attention_mask (a left-padded batch) or document_ids (packed documents), "
                                 "not both")
            if cache is not None:
                raise ValueError("document_ids (packed documents, each starting from a fresh state) is for training "
                                 "without a cache: pass cache=None and use_cache=False")
            return self._run_packed(input_ids, document_ids), None
        pads = self._left_pads(input_ids, cache, attention_mask)
        if pads is None and not isinstance(cache, PaddedCache):
            return self._run(input_ids, cache)  # no padding: the plain path
        return self._run_padded(input_ids, cache, pads)

    def _left_pads(self, input_ids: Tensor, cache: Cache | PaddedCache | None, mask: Tensor | None) -> Tensor | None:
        """Each row's left pads in this call (``[B]`` int64 on the CPU), or None when there are none. Raises a
        ``ValueError`` naming ``attention_mask`` for anything but left padding at the start of a stream."""
        if mask is None:
            return None
        B, T = input_ids.shape
        P = 0 if cache is None else cache.position
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[0] != B or mask.shape[1] not in (T, P + T):
            got = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            cols = f"{T}" if P == 0 else f"{T} (this call's tokens) or {P + T} (with the cache's {P})"
            raise ValueError(f"attention_mask must be a tensor [B, T] of 0/1 with B = {B} and T = {cols}, got {got}")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1 (or bools)")
            mask = mask != 0
        mask = mask.cpu()
        supported = ("mnemos supports left padding only (each row of attention_mask: zeros, then ones), in the first "
                     "call of a stream")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            row = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
            raise ValueError(f"attention_mask row {row} has a 0 after a 1 (right padding or a hole): {supported}")
        if mask.shape[1] == P + T and P > 0:  # the columns the cache has consumed must match it
            past = mask[:, :P]
            want = (torch.arange(P)[None, :] >= cache.row_pads()[:, None]) if isinstance(cache, PaddedCache) \
                else torch.ones_like(past)
            if not torch.equal(past, want):
                raise ValueError(f"attention_mask's first {P} columns do not match the padding of the tokens the "
                                 f"cache has consumed: {supported}")
        new = mask[:, -T:]
        pads = T - new.sum(1)
        if not bool(pads.any()):
            return None
        if cache is not None and cache.position > 0:
            raise ValueError(f"attention_mask pads tokens after the cache's {cache.position}: {supported}")
        if bool((pads == T).any()):
            row = int((pads == T).nonzero()[0])
            raise ValueError(f"attention_mask row {row} has no real token (all zeros): every row needs one")
        return pads

    def _run_packed(self, input_ids: Tensor, document_ids: Tensor) -> Tensor:
        """Packed documents: every document of every row run as its own sequence (one right-padded batch, exact by
        strict causality), the outputs put back in place."""
        if not isinstance(document_ids, Tensor) or document_ids.shape != input_ids.shape or \
                document_ids.is_floating_point() or document_ids.is_complex():
            got = f"{document_ids.dtype} of shape {tuple(document_ids.shape)}" if isinstance(document_ids, Tensor) \
                else type(document_ids).__name__
            raise ValueError(f"document_ids must be an integer tensor shaped like input_ids "
                             f"{tuple(input_ids.shape)}, got {got}")
        B, T = input_ids.shape
        starts = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        starts[:, 1:] = document_ids[:, 1:].to(input_ids.device) != document_ids[:, :-1].to(input_ids.device)
        if T == 1 or not bool(starts[:, 1:].any()):
            return self._run(input_ids, None)[0]  # one document per row: the plain path
        first = starts.flatten().nonzero().squeeze(1)  # [N] flat index of each document's first token
        lengths = torch.diff(first, append=first.new_tensor([B * T]))  # every row starts one: none crosses rows
        pos = torch.arange(int(lengths.max()), device=first.device)
        valid = pos[None, :] < lengths[:, None]  # [N, L]
        flat = (first[:, None] + pos[None, :]).clamp(max=B * T - 1)
        docs = input_ids.flatten()[flat].masked_fill(~valid, 0)  # right-padded documents [N, L]
        h, _ = self._run(docs, None)  # [N, L, d]
        return h[valid].view(B, T, h.shape[-1])  # documents in flat order are the tokens in flat order

    def _run(self, input_ids: Tensor, cache: Cache | None) -> tuple[Tensor, Cache | None]:
        if self._relays:
            return self._run_segments(input_ids, cache)
        x = self.embed(input_ids)  # [B, T, d]
        for i, block in enumerate(self.blocks):
            x, state = block(x, None if cache is None else cache.layers[i])
            if cache is not None:
                cache.layers[i] = state
        if cache is not None:
            cache.position += input_ids.shape[1]  # the one place the position advances
        return self.norm(x), cache

    def _run_segments(self, input_ids: Tensor, cache: Cache | None) -> tuple[Tensor, Cache | None]:
        """:meth:`_run` for a stack with relay mixers: segment-major, the side channel passed within each piece and
        the last relay block's value carried into the first's state at each segment end (module docstring)."""
        B, T = input_ids.shape
        first = self._relays[0]
        N = self.blocks[first].mixer.relay_period
        run = cache
        if run is None and T > N:  # several pieces: a transient cache carries the states between them
            run = self.init_cache(B, input_ids.device)
        x_all = self.embed(input_ids)  # [B, T, d]
        outs, aux, tokens = [], [], []
        t = 0
        while t < T:
            n = min(N - (0 if run is None else run.position) % N, T - t)  # up to the segment's end
            x, handed = x_all[:, t : t + n], None
            for i, block in enumerate(self.blocks):
                state = None if run is None else run.layers[i]
                if i in self._relays:
                    x, state, handed = block(x, state, handed)  # through the Block: its hooks (FSDP) run
                else:
                    x, state = block(x, state)
                if run is not None:
                    run.layers[i] = state
            if run is not None:
                run.position += n
                if run.position % N == 0:  # the segment ends: the last relay block's bank opens the next one
                    run.layers[first] = self.blocks[first].mixer.carry(run.layers[first], handed)
            outs.append(x)
            aux.append([getattr(b.mixer, "aux_loss", None) for b in self.blocks])
            tokens.append(B * n)
            t += n
        if len(outs) > 1:
            self._merge_aux_losses(aux, tokens)
        return self.norm(torch.cat(outs, 1) if len(outs) > 1 else outs[0]), cache

    def _run_padded(
        self, input_ids: Tensor, cache: Cache | PaddedCache | None, pads: Tensor | None
    ) -> tuple[Tensor, PaddedCache | None]:
        """The grouped path: each group of rows with the same pads runs alone, without its pads (``pads`` None: a
        later call of a padded stream, no new pads, the groups of ``cache``)."""
        B, T = input_ids.shape
        if isinstance(cache, PaddedCache):
            rows, starts, subs = cache.rows, [0] * len(cache.rows), list(cache.groups)
        else:
            starts = sorted(set(pads.tolist()))
            rows = [(pads == p).nonzero().squeeze(1).to(input_ids.device) for p in starts]
            subs = [None if cache is None else cache.select(r) for r in rows]
        out, aux = None, []
        for g, (r, start) in enumerate(zip(rows, starts, strict=True)):
            h, subs[g] = self._run(input_ids[r, start:], subs[g])
            if out is None:
                out = h.new_zeros(B, T, h.shape[-1])
            out[r, start:] = h
            aux.append([getattr(b.mixer, "aux_loss", None) for b in self.blocks])
        self._merge_aux_losses(aux, [r.numel() * (T - s) for r, s in zip(rows, starts, strict=True)])
        if cache is None:
            return out, None
        if isinstance(cache, PaddedCache):
            cache.groups, cache.position = subs, cache.position + T
            return out, cache
        return out, PaddedCache(subs, rows, starts, cache.position + T, B)

    def _merge_aux_losses(self, aux: list[list[Tensor | None]], tokens: list[int]) -> None:
        """Each mixer's ``aux_loss`` after a grouped call: the token-weighted mean of its groups' losses (an
        approximation of the loss of the batch as a whole: MoM's load balancing is not linear in the tokens)."""
        total = sum(tokens)
        for i, block in enumerate(self.blocks):
            losses = [(a[i], n) for a, n in zip(aux, tokens, strict=True) if a[i] is not None]
            if losses:
                block.mixer.aux_loss = sum(loss * (n / total) for loss, n in losses)

    def forward(
        self,
        input_ids: Tensor,
        cache: Cache | PaddedCache | None = None,
        *,
        use_cache: bool = False,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> tuple[Tensor, Cache | PaddedCache | None]:
        """Logits ``[B, T, V]`` and the cache (see the class docstring). ``attention_mask``: a left-padded batch
        (:meth:`features`): the logits at the pads are zeros, each row's others equal those of the row alone, and
        the cache returned is a :class:`PaddedCache` to continue the batch with. ``document_ids``: packed documents,
        each from a fresh state (training, no cache)."""
        if cache is None and use_cache:
            cache = self.init_cache(input_ids.shape[0], input_ids.device)
        h, cache = self.features(input_ids, cache, attention_mask=attention_mask, document_ids=document_ids)
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
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Continue ``input_ids [B, T]`` by ``max_new_tokens``: greedy (argmax) or sampled at ``temperature``.

        Returns ``[B, T + max_new_tokens]``. The prompt is read in one call, then one token per call with the cache.
        ``attention_mask`` ``[B, T]``: prompts of different lengths, left-padded (zeros then ones per row); each row
        continues as its prompt alone would (the pads stay at the front of the result; see :meth:`features`).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        cache = self.init_cache(input_ids.shape[0], input_ids.device)
        out = [input_ids]
        logits, cache = self(input_ids, cache, attention_mask=attention_mask)
        for i in range(max_new_tokens):
            last = logits[:, -1].float()  # [B, V]
            if not bool(torch.isfinite(last).all()):  # argmax of NaN would pick a token silently
                raise FloatingPointError(
                    f"non-finite logits after {cache.position} tokens: the model's state overflowed (a test-time "
                    "memory diverging: lower memory.max_lr, keep memory.ema_momentum and memory.momentum_clock on)")
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
