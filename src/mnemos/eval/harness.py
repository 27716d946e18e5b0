"""The evaluation harness: run :class:`~mnemos.eval.stateful.StatefulLM` models on the offline tasks of
:mod:`mnemos.data` and record one :class:`~mnemos.eval.results.Cell` per grid point.

The tasks are registered in :mod:`mnemos.eval.tasks` (one module each, :class:`~mnemos.eval.registry.EvalTask`,
which says what it measures: MQAR's teacher-forced recall, S-NIAH, BABILong and passkey capacity by greedy decoding,
LM loss); what their evaluations share (options, refusals, streaming, greedy decoding) is :mod:`mnemos.eval.runner`.

A KV-cache policy (:mod:`mnemos.kv`) runs through :class:`KVPolicyLM`, which wraps a mnemos or Hugging Face model so
that every state it starts is a cache of that policy; ``run_eval(..., kv_policies=[...])`` (``mnemos eval
--kv-policy SPEC``) evaluates each attention model once per policy, and the cells record the policy's spec.

``EvalOptions(jrt=True)`` (``mnemos eval --jrt``) runs every task a second time with JRT-Prompt, the context
repeated before the queries, in cells of a model named ``"<name> (JRT-Prompt)"`` (:mod:`mnemos.eval.jrt`).

Every context is fed through ``model.forward`` ``stream_chunk`` tokens at a time with the state carried, so a
model with a constant-size state reads a haystack of millions of tokens in constant memory. A model whose state
grows (attention) is refused, with the reason recorded in the cell, when a context exceeds its ``max_context`` or
its state would exceed ``memory_budget_gb``; a cell that fails anyway (out of memory, an exception in the model)
is recorded as an error and the other cells still run (``raise_errors=True`` to stop instead). Samples
of equal length are batched (``batch_size``).

>>> from mnemos.data import MQARConfig
>>> from mnemos.eval.reference_models import InductionLM
>>> res = evaluate(InductionLM(vocab_size=64), MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4,
...                num_examples=8, noise="disjoint"), options=EvalOptions(progress=False))
>>> res.cells[0].task, res.cells[0].metrics["accuracy"], res.cells[0].metrics["context_value_rate"]
('mqar', 1.0, 1.0)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mnemos.eval._progress import progress_bar
from mnemos.eval.adapters import HFCausalLMAdapter, MnemosLMAdapter, load_model
from mnemos.eval.jrt import check_jrt
from mnemos.eval.registry import EvalTaskConfig, config_from_dict, config_to_dict, task_of
from mnemos.eval.report import write_report
from mnemos.eval.results import Cell, EvalResults
from mnemos.eval.runner import EvalOptions, Run, auto_memory_budget_gb
from mnemos.eval.stateful import StatefulLM
import mnemos.eval.tasks  # noqa: F401  (registers the tasks that task_of and config_from_dict look up)
from mnemos.eval.tasks.mqar import model_reach
from mnemos.kv.base import Bytes, EvictionPolicy, attention_layers, use_kv_policy
from mnemos.kv.eviction import SnapKV
from mnemos.kv.spec import PolicySpec, parse_policy_spec

__all__ = [
    "EvalOptions",
    "EvalTaskConfig",
    "KVPolicyLM",
    "auto_memory_budget_gb",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "model_reach",
    "run_eval",
    "with_kv_policies",
    "task_name",
    "task_vocab_size",
]


def task_name(config: EvalTaskConfig) -> str:
    """The registered name of ``config``'s task (``"niah"`` for a ``NIAHConfig``)."""
    return task_of(config).name


def task_vocab_size(config: EvalTaskConfig) -> int:
    """The vocabulary a model needs for ``config``'s token ids (byte tokens for the text tasks)."""
    return task_of(config).vocab_size(config)


# -- KV-cache policies ------------------------------------------------------------------------------------------------

def _bounds_cache(policy: Any) -> bool:
    """Whether ``policy`` keeps a cache of bounded size whatever the context: token eviction with an absolute budget
    (tokens or bytes, not a ratio) applied at every call (SnapKV / PyramidKV append while decoding unless
    ``compress_decoding``)."""
    policy = getattr(policy, "eviction", policy)  # eviction + KIVI: the eviction part bounds the entries
    if not isinstance(policy, EvictionPolicy) or (isinstance(policy.budget, float) and not isinstance(policy.budget,
                                                                                                        Bytes)):
        return False
    return not isinstance(policy, SnapKV) or policy.compress_decoding


class KVPolicyLM(StatefulLM):
    """A mnemos or Hugging Face model whose KV caches follow a :mod:`mnemos.kv` policy.

    ``init_state`` makes the base model's state with the policy set on every attention layer (mnemos:
    :func:`mnemos.kv.use_kv_policy` around ``init_cache``; Hugging Face Llama-family: a fresh
    :class:`mnemos.kv.hf.PolicyCache`); everything else is the base model's. The name is ``"<base> + <spec>"`` and
    :meth:`describe` adds ``kv_policy`` (the spec's canonical text), ``kv_policy_name`` and ``base_model``, so every
    cell records the policy. A policy that bounds the cache (eviction with an absolute budget) makes the state
    ``"constant"``; others keep the base model's growth (measured per token, for the memory budget).

    Raises ValueError when the policy cannot serve the model: no attention layer, a policy MAC cannot take on a MAC
    model (``Policy.mac_refusal``), a head dim KIVI's group does
    not divide, a Hugging Face model that is not Llama-family, or another kind of model.
    """

    def __init__(self, base: StatefulLM, spec: PolicySpec):
        if spec.policy is None:
            raise ValueError("spec must name a policy (not none); evaluate the base model itself instead")
        self.base, self.spec, self.policy = base, spec, spec.policy
        if isinstance(base, MnemosLMAdapter):
            self._hf = False
            with use_kv_policy(base.model, self.policy):  # checks every layer (attention present, MAC's refusals, shapes)
                pass
        elif isinstance(base, HFCausalLMAdapter):
            from mnemos.kv.hf import PolicyCache  # transformers is imported only for Hugging Face models

            self._hf = True
            PolicyCache(base.model, self.policy)  # checks the config (Llama-family, no sliding window, head dim)
        else:
            raise ValueError(f"{base.name} ({type(base).__name__}) is neither a mnemos nor a Hugging Face model: no "
                             "KV cache for a policy to manage")
        self.name = f"{base.name} + {spec.text}"
        self.vocab_size, self.max_context = base.vocab_size, base.max_context
        self.tokenizer, self.device = base.tokenizer, base.device
        self.state_growth = "constant" if _bounds_cache(self.policy) else base.state_growth

    def init_state(self, batch: int) -> Any:
        if self._hf:
            from mnemos.kv.hf import PolicyCache

            return PolicyCache(self.base.model, self.policy)
        with use_kv_policy(self.base.model, self.policy):
            return self.base.init_state(batch)

    def forward(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        if self._hf:
            from mnemos.kv.hf import cache_kwarg

            model = self.base.model
            out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): state})
            return out.logits, state  # the PolicyCache is updated in place
        return self.base.forward(ids, state)

    def encode_prompt(self, text: str) -> list[int]:
        return self.base.encode_prompt(text)

    def describe(self) -> dict[str, Any]:
        d = self.base.describe()
        d.update(name=self.name, state_growth=self.state_growth, base_model=self.base.name,
                 kv_policy=self.spec.text, kv_policy_name=self.spec.name, kv_policy_repr=repr(self.policy))
        return d


def with_kv_policies(models: Sequence[StatefulLM], specs: Sequence[PolicySpec | str]) -> list[StatefulLM]:
    """Each model under each policy of ``specs`` (strings are parsed with :func:`mnemos.kv.parse_policy_spec`, so
    one may be a sweep), model by model: the base model itself for ``none``, a :class:`KVPolicyLM` otherwise. A
    model no policy can serve (a recurrent or neural-memory model, a reference model) is kept once, as it is,
    with a warning, so it still sits on the same accuracy-against-bytes axes; a ValueError (naming ``--kv-policy``)
    when no model can take a policy, or when a policy does not fit an attention model (e.g. KIVI's group size)."""
    parsed = [p for s in specs for p in (parse_policy_spec(s) if isinstance(s, str) else [s])]
    if not parsed:
        return list(models)
    out: list[StatefulLM] = []
    served = False
    for m in models:
        mine: list[StatefulLM] = []
        for spec in parsed:
            if spec.policy is None:
                mine.append(m)
                continue
            try:
                mine.append(KVPolicyLM(m, spec))
                served = True
            except ValueError as e:
                if _has_kv_cache(m):  # an attention model the policy does not fit: the user's spec is wrong
                    raise ValueError(f"--kv-policy {spec.text} on {m.name}: {e}") from None
                warnings.warn(f"--kv-policy: {m.name} has no KV cache a policy can manage ({e}); evaluated as is",
                              stacklevel=2)
                mine = [m]
                break
        out.extend(dict.fromkeys(mine))  # `none` and an unservable model: once
    if not served and any(p.policy is not None for p in parsed):
        raise ValueError("--kv-policy: none of the models has attention with a KV cache a policy can manage (mnemos "
                         "transformer / swa / mag / mal, or a Hugging Face Llama-family model)")
    return out


def _has_kv_cache(model: StatefulLM) -> bool:
    """Whether ``model`` is a mnemos model with policy-capable attention, or a Hugging Face model."""
    if isinstance(model, HFCausalLMAdapter):
        return True
    if not isinstance(model, MnemosLMAdapter):
        return False
    try:
        attention_layers(model.model)
    except ValueError:
        return False
    return True


# -- the entry points -----------------------------------------------------------------------------------------------

def evaluate(
    model: StatefulLM | Sequence[StatefulLM],
    task: EvalTaskConfig | Sequence[EvalTaskConfig],
    *,
    seed: int = 0,
    options: EvalOptions | None = None,
) -> EvalResults:
    """Run every model on every task config (``task.build(seed)`` makes the data) and return the cells.

    ``model``: one :class:`~mnemos.eval.stateful.StatefulLM` or several (wrap mnemos models in
    :class:`~mnemos.eval.adapters.MnemosLMAdapter`). ``task``: one config or several (e.g. an MQAR grid from
    :func:`mnemos.data.mqar_grid`). Cells come out model by model, then task by task, in grid order.
    """
    options = options or EvalOptions()
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if not models or not tasks:
        raise ValueError(f"need at least one model and one task, got {len(models)} and {len(tasks)}")
    for m in models:
        if not isinstance(m, StatefulLM):
            hint = " (wrap it: MnemosLMAdapter(model))" if hasattr(m, "init_cache") else ""
            raise TypeError(f"models must be StatefulLM instances, got {type(m).__name__}{hint}")
    for t in tasks:
        task_of(t)
    if options.jrt:  # before any model runs: a task without a separable context is an error, never a silent no-op
        check_jrt(task_of(t) for t in tasks)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    cells: list[Cell] = []
    for m in models:
        total = sum(task_of(t).tokens(t, options) for t in tasks) * (2 if options.jrt else 1)
        bar = progress_bar(total, m.name, options.progress)
        try:
            for t in tasks:
                cells.extend(task_of(t).evaluate(Run(m, t, seed, options, bar, models)))
                if options.jrt:  # the same task with JRT-Prompt, its cells beside the plain ones
                    cells.extend(task_of(t).evaluate(Run(m, t, seed, options, bar, models, jrt=True)))
        finally:
            bar.close()
    return EvalResults(cells)


def run_eval(
    model_specs: Sequence[str],
    task: EvalTaskConfig | Sequence[EvalTaskConfig],
    *,
    seed: int = 0,
    options: EvalOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    plots: bool = True,
    kv_policies: Sequence[str | PolicySpec] = (),
) -> EvalResults:
    """What ``mnemos eval`` does: load each model spec (:func:`~mnemos.eval.adapters.load_model`), put each under
    every KV policy of ``kv_policies`` (:func:`with_kv_policies`; none: the models as they are), evaluate, and
    write ``results.json``, ``report.md`` and the figures to ``out_dir`` (when given)."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if not model_specs:
        raise ValueError("give at least one model")
    if options is not None and options.jrt:  # before loading the models
        check_jrt(task_of(t) for t in tasks)
    vocab = max(task_vocab_size(t) for t in tasks)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_model(s, vocab_size=vocab, device=device, dtype=dtype) for s in model_specs]
    models = with_kv_policies(models, kv_policies)
    results = evaluate(models, tasks, seed=seed, options=options)
    if out_dir is not None:
        write_report(results, out_dir, plots=plots)
    return results
