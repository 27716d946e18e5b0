"""What the harness needs from a model: the :class:`StatefulLM` protocol, and :func:`state_size` to weigh a state.

The harness sees every model as a :class:`StatefulLM`: ``init_state(B)`` then ``forward(ids [B, T], state) ->
(logits [B, T, V], state)``, called as often as needed, so a context of any length can be streamed through it
chunk by chunk. Besides that the model says whether its state stays the same size (a recurrent memory, a sliding
window) or grows with the context (an attention KV cache), and the longest context it accepts; the harness uses
both to refuse, with a message, a context the model cannot hold, instead of running out of memory. Models:
:mod:`mnemos.eval.adapters` (mnemos and Hugging Face models) and :mod:`mnemos.eval.reference_models` (reference models).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from mnemos.data.tokenizer import Tokenizer

__all__ = ["StateGrowth", "StateSize", "StatefulLM", "state_size"]

StateGrowth = Literal["constant", "growing"]


class StatefulLM(ABC):
    """A causal language model driven one chunk at a time with an explicit state.

    Subclasses set the attributes and implement :meth:`init_state` and :meth:`forward`:

    - ``name``: a short label for tables and plots.
    - ``vocab_size``: V, the width of the logits (token ids fed in must be < V).
    - ``state_growth``: ``"constant"`` if the state has a fixed size whatever the context length, ``"growing"`` if
      it grows with it (an attention KV cache).
    - ``max_context``: the longest context (prompt + generated tokens) the model accepts, or None for no limit.
    - ``tokenizer``: None when the model reads the task's own token ids (MQAR's integers; the UTF-8 bytes of
      :class:`~mnemos.data.ByteTokenizer` for the text tasks), else the :class:`~mnemos.data.Tokenizer` the text
      tasks' prompts are re-encoded with.
    - ``device``: where ``forward`` wants its input ids.

    Contract: calling ``forward`` on ``ids[:, :t]`` and then on ``ids[:, t:]`` with the returned state gives the
    same logits as one call on ``ids`` (up to floating-point rounding). ``forward`` may update the state in place;
    the harness never reuses a state after passing it on.
    """

    name: str = "model"
    vocab_size: int
    state_growth: StateGrowth = "constant"
    max_context: int | None = None
    tokenizer: Tokenizer | None = None
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def init_state(self, batch: int) -> Any:
        """The state before the first token, for ``batch`` sequences."""

    @abstractmethod
    def forward(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        """``ids [B, T] int64`` and the state -> ``(logits [B, T, V], new state)``; logits at t predict token t+1."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt that starts a sequence (a tokenizer may add BOS here). Needs ``tokenizer``."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer; the harness feeds it the task's token ids")
        return self.tokenizer.encode(text)

    def describe(self) -> dict[str, Any]:
        """What the results record about the model: name, class, vocab, state growth, max context, parameters."""
        return {
            "name": self.name,
            "class": type(self).__name__,
            "vocab_size": self.vocab_size,
            "state_growth": self.state_growth,
            "max_context": self.max_context,
            "tokenizer": repr(self.tokenizer) if self.tokenizer is not None else None,
        }

    def bytes_per_token(self) -> float:
        """Bytes the state grows by per token and sequence (0 for a constant state).

        Measured once, by feeding one and then two more tokens to a batch of one and weighing the state each time
        (:func:`state_size`); subclasses that know the number may override it.
        """
        if self.state_growth == "constant":
            return 0.0
        cached = getattr(self, "_bytes_per_token", None)
        if cached is None:
            with torch.no_grad():
                state = self.init_state(1)
                _, state = self.forward(torch.zeros(1, 1, dtype=torch.int64, device=self.device), state)
                one = state_size(state).nbytes
                _, state = self.forward(torch.zeros(1, 2, dtype=torch.int64, device=self.device), state)
                three = state_size(state).nbytes
            cached = max(three - one, 0) / 2
            self._bytes_per_token = cached
        return cached


class StateSize(NamedTuple):
    """How big a state is: elements, their bytes, and the bytes of the storages they keep alive."""

    numel: int
    nbytes: int
    storage_bytes: int


def state_size(state: Any) -> StateSize:
    """Size of every tensor reachable from ``state``: through dicts, lists, tuples and object attributes (so mnemos
    caches, ``KVCache`` objects and Hugging Face ``Cache`` objects all count).

    ``numel`` and ``nbytes`` count the elements the state's tensors hold, **each element once**: two tensors that are
    views of the same memory (a neural memory's chunk anchor at a chunk boundary is a view of its weights) hold it
    once. ``storage_bytes`` sums the distinct storages they live in, which is what the state keeps alive: a state that
    holds a small view of a large activation (say, the last few inputs of a short conv sliced from the whole call's
    input) pins all of it. ``nn.Module`` objects are skipped: weights are not state.
    """
    tensors: list[Tensor] = []
    seen: set[int] = set()
    stack = [state]
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            tensors.append(obj)
        elif isinstance(obj, torch.nn.Module):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
    numel = nbytes = 0
    by_storage: dict[tuple[str, int], list[Tensor]] = {}
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:  # no memory to share
            numel += t.numel()
            nbytes += t.numel() * t.element_size()
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        storages[key] = st.nbytes()
        by_storage.setdefault(key, []).append(t)
    for key, group in by_storage.items():
        views = list({(t.storage_offset(), tuple(t.shape), t.stride(), t.dtype): t for t in group}.values())
        if len(views) == 1:
            numel += views[0].numel()
            nbytes += views[0].numel() * views[0].element_size()
        else:  # distinct views of one storage: mark the bytes each covers
            n, e = _covered_bytes(views, storages[key])
            numel += n
            nbytes += e
    return StateSize(numel, nbytes, sum(storages.values()))


def _covered_bytes(views: list[Tensor], storage_nbytes: int) -> tuple[int, int]:
    """``(elements, bytes)`` of one storage that ``views`` cover together, each byte once (a mask of the storage's
    bytes: only for storages that several distinct views share). Elements: the bytes over the widest element size
    when the views' dtypes differ."""
    mask = torch.zeros(storage_nbytes, dtype=torch.bool)
    for t in views:
        e = t.element_size()
        mask.as_strided((*t.shape, e), (*(s * e for s in t.stride()), 1), t.storage_offset() * e).fill_(True)
    covered = int(mask.sum())
    return covered // max(t.element_size() for t in views), covered
