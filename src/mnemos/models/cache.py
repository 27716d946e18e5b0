"""Decoding state of a whole model: one typed state per layer plus the absolute position, serialisable.

Each layer holds the state its mixer keeps between calls: a :class:`~mnemos.layers.NeuralMemoryState` (LMM), a
:class:`MACState`, :class:`MAGState` or :class:`MALState` (the Titans hybrids, defined here), a
:class:`~mnemos.layers.KVCache` (Transformer++, SWA) or a :class:`RecurrentState` (the linear baselines). Which
variant keeps which, and what bounds its size (constant, the window, the segment, or the tokens seen), is in the
variant's registry entry (:mod:`mnemos.models.registry`: ``VariantSpec.state`` and ``state_bound``).

:meth:`Cache.state_dict` flattens everything to plain tensors under dotted keys (``torch.save`` it and
``torch.load(..., weights_only=True)`` it back); :meth:`Cache.load_state_dict` restores it into a cache made by
``model.init_cache`` for the same config and batch size. :meth:`Cache.reorder` picks streams (beam search) and
:meth:`Cache.select` any number of them; they rely on every tensor of a layer state being batch-first, which a new
state type (or a custom ``KVCache``'s ``state_dict``) must keep, and ``select`` to another batch size on a
``KVCache`` keeping its batch size in a ``batch_size`` attribute (every KV cache of mnemos does).

:class:`PaddedCache` is the state of a left-padded batch: one :class:`Cache` per group of rows with the same number
of pads (``MnemosLM.features``, ``attention_mask``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor

from ..layers import KVCache, NeuralMemoryState
from ..ops import MemoryState

__all__ = ["Cache", "PaddedCache", "MACState", "MAGState", "MALState", "RecurrentState", "LayerState"]

# a field whose tensors grow along dim 1 within a bounded range (MAC's segment buffers) is marked so; every other
# tensor must come back from a state dict with the exact shape it has in a fresh cache
_RAGGED = {"ragged_dim": 1}


@dataclass
class RecurrentState:
    """State of a linear-recurrence baseline (linear attention, DeltaNet, Gated DeltaNet): the matrix memory
    ``[B, H, D, D]`` as a :class:`~mnemos.ops.MemoryState`, and the short conv's last inputs (None without a conv)."""

    memory: MemoryState
    conv: Tensor | None


@dataclass
class MAGState:
    """Memory as a gate: the sliding-window attention's rolling cache and the memory branch's state."""

    attn: KVCache
    memory: NeuralMemoryState


@dataclass
class MALState:
    """Memory as a layer: the memory's state and the sliding-window attention's rolling cache behind it."""

    memory: NeuralMemoryState
    attn: KVCache


@dataclass
class MACState:
    """Memory as a context, in the middle of a segment of N tokens.

    Attributes:
        memory: the neural memory after the last token (it is written with every attention output y_t).
        segment_memory: L tensors ``[B, H, D_out, D_in]``, the memory's weights at the start of the current segment:
            what the segment's retrievals h_t read.
        x_tail: ``[B, conv_size - 1, d]``, the last mixer inputs (the retrieval queries' conv history).
        k_h, v_h: ``[B, n, H, D]`` attention keys/values of the segment's retrieved tokens h_1..h_n so far.
        k_x, v_x: ``[B, n, H, D]`` attention keys/values of the segment's tokens so far (empty under a KV policy).
        kv: under a KV policy (``mnemos.kv``, set on the mixer's attention), the policy's cache of the segment's
            tokens, emptied at every segment boundary (its keys and values instead of k_x, v_x); else None.

    ``n = k_h.shape[1]`` is the number of tokens of the current segment already seen, ``0 <= n < N``.
    """

    memory: NeuralMemoryState
    segment_memory: tuple[Tensor, ...]
    x_tail: Tensor
    k_h: Tensor = field(metadata=_RAGGED)
    v_h: Tensor = field(metadata=_RAGGED)
    k_x: Tensor = field(metadata=_RAGGED)
    v_x: Tensor = field(metadata=_RAGGED)
    kv: KVCache | None = None

    @property
    def segment_offset(self) -> int:
        return self.k_h.shape[1]


LayerState = Union[NeuralMemoryState, KVCache, MACState, MAGState, MALState, RecurrentState]


# ----------------------------------------------------------------------------------------------------------------------
# generic walks over a state: flatten to tensors, rebuild from tensors, map a function over tensors


def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, bool):
        raise TypeError(f"{prefix}: unexpected bool in a decoding state")
    elif isinstance(obj, int):
        out[prefix] = torch.tensor(obj, dtype=torch.int64)
    elif isinstance(obj, KVCache):
        for k, v in obj.state_dict().items():
            out[f"{prefix}.{k}"] = v
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _flatten(getattr(obj, f.name), f"{prefix}.{f.name}", out)
    elif isinstance(obj, (tuple, list)):
        for i, x in enumerate(obj):
            _flatten(x, f"{prefix}.{i}", out)
    elif obj is not None:
        raise TypeError(f"{prefix}: cannot serialise a {type(obj).__name__}")


def _rebuild(template: Any, prefix: str, sd: dict[str, Tensor], used: set[str], ragged: int | None = None) -> Any:
    """A new state shaped like ``template`` with the tensors of ``sd`` (moved to the template's device and dtype)."""
    if isinstance(template, Tensor):
        if prefix not in sd:
            raise ValueError(f"state dict is missing key {prefix!r}")
        used.add(prefix)
        t = sd[prefix]
        want, got = list(template.shape), list(t.shape)
        if ragged is not None and len(got) == len(want):
            got[ragged] = want[ragged] = -1
        if got != want:
            raise ValueError(f"{prefix} must have shape {tuple(template.shape)}, got {tuple(t.shape)}")
        return t.to(device=template.device, dtype=template.dtype)
    if isinstance(template, int):
        if prefix not in sd:
            raise ValueError(f"state dict is missing key {prefix!r}")
        used.add(prefix)
        return int(sd[prefix])
    if isinstance(template, KVCache):
        keys = set(template.state_dict())
        missing = [f"{prefix}.{k}" for k in sorted(keys) if f"{prefix}.{k}" not in sd]
        if missing:
            raise ValueError(f"state dict is missing keys {missing}")
        new = copy.copy(template)
        new.load_state_dict({k: sd[f"{prefix}.{k}"] for k in keys})
        used.update(f"{prefix}.{k}" for k in keys)
        return new
    if dataclasses.is_dataclass(template):
        kwargs = {
            f.name: _rebuild(getattr(template, f.name), f"{prefix}.{f.name}", sd, used, f.metadata.get("ragged_dim"))
            for f in dataclasses.fields(template)
        }
        return type(template)(**kwargs)
    if isinstance(template, (tuple, list)):
        return type(template)(_rebuild(x, f"{prefix}.{i}", sd, used, ragged) for i, x in enumerate(template))
    if template is None:
        return None
    raise TypeError(f"{prefix}: cannot restore a {type(template).__name__}")


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor], kv_fn: Callable[[KVCache], KVCache]) -> Any:
    """A copy of a state with ``fn`` applied to every tensor and ``kv_fn`` to every KV cache (which must return a
    new cache: the original is never changed in place)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, KVCache):
        return kv_fn(obj)
    if dataclasses.is_dataclass(obj):
        return type(obj)(**{f.name: _map_tensors(getattr(obj, f.name), fn, kv_fn) for f in dataclasses.fields(obj)})
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn, kv_fn) for x in obj)
    return obj


def _detach_kv(kv: KVCache) -> KVCache:
    new = copy.copy(kv)  # shallow: load_state_dict rebinds the copy's tensors
    new.load_state_dict({k: v.detach() for k, v in kv.state_dict().items()})
    return new


# ----------------------------------------------------------------------------------------------------------------------


def _reorder_index(index: Tensor, batch_size: int) -> Tensor:
    """``index`` as a tensor, checked to be a beam-search reorder: 1-D integers, one per stream of the batch."""
    index = torch.as_tensor(index)
    if index.ndim != 1 or index.numel() != batch_size or index.is_floating_point():
        raise ValueError(f"index must be a 1-D integer tensor of {batch_size} stream indices, got "
                         f"{index.dtype} of shape {tuple(index.shape)}")
    return index


@dataclass
class Cache:
    """Everything :class:`~mnemos.models.MnemosLM` needs to continue a batch of streams exactly.

    Attributes:
        layers: one state per block, typed by the variant (see the module docstring).
        position: the absolute position of the next token (tokens consumed so far); the model advances it once per
            call, by the number of tokens of that call.
        batch_size: B, fixed for the cache's life.

    A forward call updates the cache it is given *in place* (attention caches grow inside their objects) and returns
    it. To keep a copy, use ``state_dict`` (or :meth:`detach`, which copies).
    """

    layers: list[LayerState]
    position: int = 0
    batch_size: int = 1

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors under dotted keys (``position``, ``layers.{i}.<field path>``)."""
        out: dict[str, Tensor] = {
            "position": torch.tensor(self.position, dtype=torch.int64),
            "batch_size": torch.tensor(self.batch_size, dtype=torch.int64),
        }
        for i, layer in enumerate(self.layers):
            _flatten(layer, f"layers.{i}", out)
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` in place. ``self`` must come from ``init_cache`` of a model with the same
        config and batch size (it supplies the structure, devices and dtypes); every key must be used exactly."""
        if not isinstance(sd, dict):
            raise TypeError(f"state dict must be a dict, got {type(sd).__name__}")
        for key in ("position", "batch_size"):
            if key not in sd:
                raise ValueError(f"state dict is missing key {key!r}")
        if int(sd["batch_size"]) != self.batch_size:
            raise ValueError(f"state dict is for batch size {int(sd['batch_size'])}, this cache has {self.batch_size}")
        used = {"position", "batch_size"}
        layers = [_rebuild(layer, f"layers.{i}", sd, used) for i, layer in enumerate(self.layers)]
        unknown = sorted(set(sd) - used)
        if unknown:
            raise ValueError(f"state dict has unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        position = int(sd["position"])
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.layers, self.position = layers, position

    def detach(self) -> "Cache":
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        return Cache(_map_tensors(self.layers, Tensor.detach, _detach_kv), self.position, self.batch_size)

    def reorder(self, index: Tensor) -> "Cache":
        """A copy whose stream i continues this cache's stream ``index[i]`` (beam search's step: streams may repeat
        or drop out; the batch size stays). Every tensor of a layer state is batch-first, the KV caches' included."""
        return self.select(_reorder_index(index, self.batch_size))

    def select(self, index: Tensor) -> "Cache":
        """A copy holding the streams ``index`` (any number >= 1, repeats allowed): stream i of the copy continues
        this cache's stream ``index[i]``, and its batch size is ``len(index)``. :meth:`reorder` is the case of an
        unchanged batch size; a left-padded batch (:class:`PaddedCache`) splits a cache into its groups with it."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.numel() < 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(f"index must be a 1-D integer tensor of stream indices, got {index.dtype} of shape "
                             f"{tuple(index.shape)}")
        if bool((index < 0).any()) or bool((index >= self.batch_size).any()):
            raise ValueError(f"index values must lie in [0, {self.batch_size}), got {index.tolist()}")
        index = index.long()

        def pick(t: Tensor) -> Tensor:
            return t.index_select(0, index.to(t.device))

        def pick_kv(kv: KVCache) -> KVCache:
            new = copy.copy(kv)  # shallow: load_state_dict rebinds the copy's tensors
            if index.numel() != self.batch_size:  # every KV cache of mnemos keeps its batch size as .batch_size
                if not isinstance(getattr(kv, "batch_size", None), int):
                    raise TypeError(f"{type(kv).__name__} has no batch_size attribute: its streams can be reordered "
                                    "but not selected into a batch of another size")
                new.batch_size = index.numel()
            new.load_state_dict({k: pick(v) if v.ndim else v for k, v in kv.state_dict().items()})
            return new

        return Cache(_map_tensors(self.layers, pick, pick_kv), self.position, index.numel())

    def to(self, device=None, dtype=None) -> "Cache":
        """A copy on ``device`` with floating-point tensors cast to ``dtype`` (each None: unchanged)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        def move_kv(kv: KVCache) -> KVCache:
            if not hasattr(kv, "to"):
                raise TypeError(f"{type(kv).__name__} has no .to(device, dtype); it cannot be moved")
            return copy.copy(kv).to(device=device, dtype=dtype)  # rebinds the copy's tensors only

        return Cache(_map_tensors(self.layers, move, move_kv), self.position, self.batch_size)

    def num_elements(self) -> int:
        """Elements held across all layers: what decoding memory scales with."""
        return sum(t.numel() for k, t in self.state_dict().items() if k not in ("position", "batch_size"))


# ----------------------------------------------------------------------------------------------------------------------
# states of the recurrent baselines of issue 16 (each batch-first, so Cache serialises, reorders and moves them as is)


@dataclass
class Mamba2State:
    """State of a Mamba-2 layer (:class:`mnemos.models.mamba2.Mamba2Mixer`): the conv's last raw inputs ``conv``
    ``[B, d_inner + 2 N, conv_size - 1]`` (x, B and C before the conv) and the SSM state ``ssm`` ``[B, H, P, N]``."""

    conv: Tensor
    ssm: Tensor


@dataclass
class BasedState:
    """State of a BASED linear-attention layer (:class:`mnemos.models.based.BasedLinearAttention`): the sums over the
    tokens so far of ``v phi(k)^T``, ``kv`` ``[B, H, V, D_phi]``, and of ``phi(k)``, ``k_sum`` ``[B, H, D_phi]`` (the
    normaliser's), with ``D_phi = 1 + F + F^2`` for a feature dim F."""

    kv: Tensor
    k_sum: Tensor


@dataclass
class BaseConvState:
    """State of a BaseConv layer (:class:`mnemos.models.based.BaseConv`): the last ``conv_size - 1`` inputs of its
    convolution, ``conv`` ``[B, d, conv_size - 1]`` (zeros at the start of a stream)."""

    conv: Tensor


LayerState = Union[LayerState, Mamba2State, BasedState, BaseConvState]
__all__ += ["Mamba2State", "BasedState", "BaseConvState"]


@dataclass
class MoMState:
    """State of a MoM layer (:class:`mnemos.models.mom.MixtureOfMemories`): the M routed memories ``memories``
    ``[B, M, H, V, K]`` and the shared one ``shared`` ``[B, H, V, K]`` (None without it), each a Gated DeltaNet
    matrix, and the short conv's last inputs ``conv`` ``[B, (1 + 2 S) H D, conv_size - 1]`` (q and every memory's k
    and v; S = M + 1 with the shared memory, else M)."""

    memories: Tensor
    shared: Tensor | None
    conv: Tensor


LayerState = Union[LayerState, MoMState]
__all__ += ["MoMState"]


# ----------------------------------------------------------------------------------------------------------------------
# a left-padded batch: one sub-cache per group of rows that share a start


@dataclass
class PaddedCache:
    """Decoding state of a left-padded batch (``MnemosLM(..., attention_mask=...)``): one :class:`Cache` per group of
    rows with the same number of left pads, each holding only those rows' real tokens.

    Why groups and not a mask: many variants depend on absolute positions from the start of a stream (the memory
    rule's chunk boundaries, MAC's segments, RoPE, the sliding window, the KV cache), and a :class:`Cache` keeps one
    position for all its rows. A row with ``p`` pads therefore runs with the other rows that have ``p`` pads, from its
    first real token, as if it were alone: its logits equal those of the unpadded prompt exactly (up to the float
    rounding of a different batch size), for every variant, whatever its state. The cost is one model call per group
    and per step (at most ``B`` groups; one when all rows have the same length).

    Attributes:
        groups: one :class:`Cache` per distinct pad count, in increasing pad order; group g's ``position`` is
            ``position - pads[g]`` (the real tokens its rows have consumed).
        rows: one int64 tensor per group: the batch rows it holds, ascending (together: each row once).
        pads: the number of left pads of each group's rows.
        position: the columns of the padded batch consumed so far, pads included (what ``input_ids[:, position:]``
            slices off in Hugging Face generation).
        batch_size: B.

    Like a :class:`Cache`, a forward call updates it in place and returns it; :meth:`reorder`, :meth:`select`,
    :meth:`detach`, :meth:`to`, :meth:`state_dict` / :meth:`load_state_dict` and :meth:`num_elements` work group by
    group.
    """

    groups: list[Cache]
    rows: list[Tensor]
    pads: list[int]
    position: int = 0
    batch_size: int = 1

    def row_pads(self) -> Tensor:
        """``[B]`` int64: each row's number of left pads (on the CPU)."""
        out = torch.empty(self.batch_size, dtype=torch.int64)
        for rows, p in zip(self.rows, self.pads, strict=True):
            out[rows.cpu()] = p
        return out

    def _with(self, groups: list[Cache]) -> "PaddedCache":
        return PaddedCache(groups, [r.clone() for r in self.rows], list(self.pads), self.position, self.batch_size)

    def detach(self) -> "PaddedCache":
        """A copy cut from the autograd graph."""
        return self._with([g.detach() for g in self.groups])

    def to(self, device=None, dtype=None) -> "PaddedCache":
        """A copy on ``device`` with floating-point tensors cast to ``dtype`` (see :meth:`Cache.to`)."""
        new = self._with([g.to(device=device, dtype=dtype) for g in self.groups])
        new.rows = [r.to(device=device) for r in new.rows]
        return new

    def reorder(self, index: Tensor) -> "PaddedCache":
        """A copy whose row i continues this cache's row ``index[i]`` (beam search; the batch size stays). A row
        keeps its pads: rows chosen from different groups land in different groups of the copy."""
        return self.select(_reorder_index(index, self.batch_size))

    def select(self, index: Tensor) -> "PaddedCache":
        """A copy holding the rows ``index`` (any number >= 1, repeats allowed), each continuing this cache's row
        ``index[i]`` with its pads; groups no row is taken from are dropped."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.numel() < 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(f"index must be a 1-D integer tensor of stream indices, got {index.dtype} of shape "
                             f"{tuple(index.shape)}")
        index = index.long().cpu()
        if bool((index < 0).any()) or bool((index >= self.batch_size).any()):
            raise ValueError(f"index values must lie in [0, {self.batch_size}), got {index.tolist()}")
        group_of = torch.empty(self.batch_size, dtype=torch.int64)  # row -> its group
        local = torch.empty(self.batch_size, dtype=torch.int64)  # row -> its index inside its group
        for g, rows in enumerate(self.rows):
            rows = rows.cpu()
            group_of[rows] = g
            local[rows] = torch.arange(rows.numel())
        groups, rows_out, pads = [], [], []
        for g in range(len(self.groups)):
            new_rows = (group_of[index] == g).nonzero().squeeze(1)
            if new_rows.numel():
                groups.append(self.groups[g].select(local[index[new_rows]]))
                rows_out.append(new_rows.to(self.rows[g].device))
                pads.append(self.pads[g])
        return PaddedCache(groups, rows_out, pads, self.position, index.numel())

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors: ``position``, ``batch_size``, ``pads`` ``[G]``, ``rows.{g}`` and each group's
        :meth:`Cache.state_dict` under ``groups.{g}.``."""
        out: dict[str, Tensor] = {
            "position": torch.tensor(self.position, dtype=torch.int64),
            "batch_size": torch.tensor(self.batch_size, dtype=torch.int64),
            "pads": torch.tensor(self.pads, dtype=torch.int64),
        }
        for g, (rows, cache) in enumerate(zip(self.rows, self.groups, strict=True)):
            out[f"rows.{g}"] = rows
            out.update({f"groups.{g}.{k}": v for k, v in cache.state_dict().items()})
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` in place; ``self`` must have the same groups (rows and pads: a cache returned
        by the model for a batch padded the same way), which supply the structure, devices and dtypes."""
        if not isinstance(sd, dict):
            raise TypeError(f"state dict must be a dict, got {type(sd).__name__}")
        for key in ("position", "batch_size", "pads"):
            if key not in sd:
                raise ValueError(f"state dict is missing key {key!r}")
        if int(sd["batch_size"]) != self.batch_size or sd["pads"].tolist() != list(self.pads):
            raise ValueError(f"state dict is for batch size {int(sd['batch_size'])} with pad groups "
                             f"{sd['pads'].tolist()}, this cache has {self.batch_size} with {list(self.pads)}")
        known = {"position", "batch_size", "pads"}
        for g, rows in enumerate(self.rows):
            key = f"rows.{g}"
            if key not in sd or not torch.equal(sd[key].cpu(), rows.cpu()):
                raise ValueError(f"state dict's {key} does not match this cache's rows {rows.tolist()}")
            known.add(key)
        unknown = sorted(k for k in sd if k not in known and not k.startswith("groups."))
        if unknown:
            raise ValueError(f"state dict has unknown keys {unknown[:8]}")
        position = int(sd["position"])
        if position < max(self.pads):
            raise ValueError(f"position must be >= the largest pad count {max(self.pads)}, got {position}")
        subs = []
        for g in range(len(self.groups)):
            prefix = f"groups.{g}."
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            new = copy.copy(self.groups[g])
            new.load_state_dict(sub)  # checks the group's keys and shapes
            if new.position != position - self.pads[g]:
                raise ValueError(f"group {g} is at position {new.position}, expected {position - self.pads[g]}")
            subs.append(new)
        extra = sorted(k for k in sd if k.startswith("groups.")
                       and not (k.split(".")[1].isdigit() and int(k.split(".")[1]) < len(self.groups)))
        if extra:
            raise ValueError(f"state dict has unknown keys {extra[:8]}")
        self.groups, self.position = subs, position

    def num_elements(self) -> int:
        """Elements held across all groups and layers (what decoding memory scales with)."""
        return sum(g.num_elements() for g in self.groups)

