"""The evaluation harness: run :class:`~mnemos.eval.stateful.StatefulLM` models on the offline tasks of
:mod:`mnemos.data` and record one :class:`~mnemos.eval.results.Cell` per grid point.

- ``mqar`` (:class:`~mnemos.data.MQARConfig`): teacher-forced accuracy at the labelled (query) positions, split by
  how far back the queried pair lies and by whether the answer is one of the sample's values
  (:func:`mnemos.data.mqar_recall_metrics`).
- ``niah`` (:class:`~mnemos.data.NIAHConfig`): greedy decode after the prompt, exact match; per (length, depth).
- ``babilong`` (:class:`~mnemos.data.BABILongConfig`): greedy decode after the prompt, exact match; per length.
- ``capacity`` (:class:`~mnemos.data.PasskeyCapacityConfig`): passkey exact match per length; the report adds the
  longest length at >= 95% (:func:`mnemos.eval.tables.capacity_summary`).
- ``lm`` (:class:`~mnemos.data.LMDataConfig`): next-token loss and perplexity over windows of the val split.

Every context is fed through ``model.forward`` ``stream_chunk`` tokens at a time with the state carried, so a
model with a constant-size state reads a haystack of millions of tokens in constant memory. A model whose state
grows (attention) is refused, with the reason recorded in the cell, when a context exceeds its ``max_context`` or
its state would exceed ``memory_budget_gb``; a cell that fails anyway (out of memory, an exception in the model)
is recorded as an error and the other cells still run (``raise_errors=True`` to stop instead). Samples
of equal length are batched (``batch_size``).

>>> from mnemos.data import MQARConfig
>>> from mnemos.eval.baselines import InductionLM
>>> res = evaluate(InductionLM(vocab_size=64), MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4,
...                num_examples=8, noise="disjoint"), options=EvalOptions(progress=False))
>>> res.cells[0].task, res.cells[0].metrics["accuracy"], res.cells[0].metrics["context_value_rate"]
('mqar', 1.0, 1.0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mnemos.checkpoint import read_trainer_state
from mnemos.data import (
    IGNORE_INDEX,
    BABILongConfig,
    BABILongSample,
    ByteTokenizer,
    LMDataConfig,
    MQARConfig,
    NIAHConfig,
    NIAHSample,
    PasskeyCapacityConfig,
    exact_match,
    mqar_recall_metrics,
)
from mnemos.eval._progress import ProgressBar, progress_bar
from mnemos.eval.adapters import load_model
from mnemos.eval.report import write_report
from mnemos.eval.results import Cell, EvalResults, environment
from mnemos.eval.stateful import StatefulLM, state_size
from mnemos.models.registry import VARIANT_REGISTRY

__all__ = [
    "EvalOptions",
    "TASK_CONFIGS",
    "TaskConfig",
    "auto_memory_budget_gb",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "model_reach",
    "run_eval",
    "saved_mqar_task",
    "task_name",
    "task_vocab_size",
]

TaskConfig = Union[MQARConfig, NIAHConfig, BABILongConfig, PasskeyCapacityConfig, LMDataConfig]
TASK_CONFIGS: dict[str, type] = {
    "mqar": MQARConfig,
    "niah": NIAHConfig,
    "babilong": BABILongConfig,
    "capacity": PasskeyCapacityConfig,
    "lm": LMDataConfig,
}
_BYTES = ByteTokenizer()
_OOM_ERRORS = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


@dataclass(frozen=True)
class EvalOptions:
    """How to run (not what to measure: that is the task config).

    Attributes:
        batch_size: sequences per forward call (fewer when a growing state would not fit ``memory_budget_gb``).
        stream_chunk: tokens per forward call; None feeds each context in one call.
        memory_budget_gb: refuse contexts whose *growing* state (measured per token, see
            :meth:`StatefulLM.bytes_per_token`) would exceed this many GiB. ``"auto"``: 80% of the model device's
            memory (the GPU's, or the machine's RAM), so a context that cannot fit is refused instead of running the
            machine out of memory; None: no limit beyond ``max_context``.
        lm_max_windows: LM: how many windows of ``seq_len`` tokens of the val split to score (None: all of it).
        capacity_threshold: the accuracy the capacity summary asks for (the longest length at >= threshold).
        keep_samples: record each prompt's prediction in the generation cells.
        progress: show a progress bar (None: only when stderr is a terminal).
        raise_errors: let an exception inside a cell propagate; by default it is recorded in the cell (status
            ``"error"``, with its type and message) and the other cells still run. Running out of memory is always
            recorded.
        mqar_reach: MQAR: where near and far queries split (the queried key at most / more than this many tokens
            back; :func:`mnemos.data.mqar_recall_metrics`). ``"auto"``: one split for every model of the run, the
            reach ``n_layers * (window - 1)`` of its sliding-window models (swa, mag, mal; :func:`model_reach`) when
            they agree; when they disagree each of them is split at its own and the others not at all; no split
            when none has a window. None: no split.
    """

    batch_size: int = 8
    stream_chunk: int | None = None
    memory_budget_gb: float | Literal["auto"] | None = "auto"
    lm_max_windows: int | None = 64
    capacity_threshold: float = 0.95
    keep_samples: bool = True
    progress: bool | None = None
    raise_errors: bool = False
    mqar_reach: int | Literal["auto"] | None = "auto"

    def __post_init__(self):
        for name in ("batch_size", "stream_chunk", "lm_max_windows"):
            v = getattr(self, name)
            if (v is not None or name == "batch_size") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an int >= 1{'' if name == 'batch_size' else ' or None'}, got {v!r}")
        b = self.memory_budget_gb
        if b not in (None, "auto") and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"memory_budget_gb must be a number > 0, 'auto' or None, got {b!r}")
        if not 0.0 < self.capacity_threshold <= 1.0:
            raise ValueError(f"capacity_threshold must be in (0, 1], got {self.capacity_threshold!r}")
        r = self.mqar_reach
        if r not in (None, "auto") and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"mqar_reach must be an int >= 0, 'auto' or None, got {r!r}")


def task_name(config: TaskConfig) -> str:
    for name, cls in TASK_CONFIGS.items():
        if type(config) is cls:
            return name
    raise TypeError(f"not a task config: {type(config).__name__}; expected one of "
                    f"{', '.join(c.__name__ for c in TASK_CONFIGS.values())}")


def config_to_dict(config: TaskConfig) -> dict[str, Any]:
    """``{"type": "NIAHConfig", <fields>}``, JSON-ready (tuples as lists); :func:`config_from_dict` inverts it."""
    task_name(config)
    d = {"type": type(config).__name__}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def config_from_dict(d: dict[str, Any]) -> TaskConfig:
    """The task config :func:`config_to_dict` wrote (lists back to tuples; the config validates itself)."""
    by_type = {cls.__name__: cls for cls in TASK_CONFIGS.values()}
    cls = by_type.get(d.get("type"))
    if cls is None:
        raise ValueError(f"unknown task config type {d.get('type')!r}; expected one of {sorted(by_type)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "type"}
    return cls(**kwargs)


def task_vocab_size(config: TaskConfig) -> int:
    """The vocabulary a model needs for ``config``'s token ids (byte tokens for the text tasks)."""
    if isinstance(config, MQARConfig):
        return config.vocab_size
    if isinstance(config, LMDataConfig) and config.tokenizer == "bpe":
        return config.bpe_vocab_size
    return _BYTES.vocab_size


# -- the entry points -----------------------------------------------------------------------------------------------

def evaluate(
    model: StatefulLM | Sequence[StatefulLM],
    task: TaskConfig | Sequence[TaskConfig],
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
        task_name(t)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    cells: list[Cell] = []
    reaches = _mqar_reaches(models, options.mqar_reach)
    for m, reach in zip(models, reaches, strict=True):
        total = sum(_task_tokens(t, options) for t in tasks)
        bar = progress_bar(total, m.name, options.progress)
        try:
            for t in tasks:
                run = _Run(m, t, seed, options, bar, reach)
                cells.extend(_EVALUATORS[type(t)](run))
        finally:
            bar.close()
    return EvalResults(cells)


def run_eval(
    model_specs: Sequence[str],
    task: TaskConfig | Sequence[TaskConfig],
    *,
    seed: int = 0,
    options: EvalOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    plots: bool = True,
) -> EvalResults:
    """What ``mnemos eval`` does: load each model spec (:func:`~mnemos.eval.adapters.load_model`), evaluate, and
    write ``results.json``, ``report.md`` and the figures to ``out_dir`` (when given)."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task]
    if not model_specs:
        raise ValueError("give at least one model")
    vocab = max(task_vocab_size(t) for t in tasks)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_model(s, vocab_size=vocab, device=device, dtype=dtype) for s in model_specs]
    results = evaluate(models, tasks, seed=seed, options=options)
    if out_dir is not None:
        write_report(results, out_dir, plots=plots)
    return results


# -- shared machinery ------------------------------------------------------------------------------------------------

class _Run:
    """One (model, task config) evaluation: what every cell of it shares."""

    def __init__(self, model: StatefulLM, config: TaskConfig, seed: int, options: EvalOptions, bar: ProgressBar,
                 reach: int | None = None):
        self.model, self.config, self.seed, self.options, self.bar = model, config, seed, options, bar
        self.reach = reach  # MQAR's near / far split for this model
        self.task = task_name(config)
        self.description = model.describe()
        self.versions = environment(model.device)
        self.task_config = config_to_dict(config)
        self.option_dict = dataclasses.asdict(options)

    def cell(self, params: dict[str, Any], **kw) -> Cell:
        return Cell(task=self.task, model=dict(self.description), seed=self.seed, task_config=dict(self.task_config),
                    params=params, options=dict(self.option_dict), versions=dict(self.versions), **kw)

    def guarded(self, params: dict[str, Any], body: Callable[[], Cell]) -> Cell:
        """``body()`` timed; if it fails, an error cell (unless ``raise_errors``), so the other cells still run."""
        self.bar.set_description(f"{self.model.name} {self.task} {_params_text(params)}")
        t0 = time.perf_counter()
        try:
            cell = body()
        except _OOM_ERRORS as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cell = self.cell(params, status="error", message=f"out of memory: {str(e).splitlines()[0][:300]}")
        except Exception as e:
            if self.options.raise_errors:
                raise
            first = (str(e).splitlines() or [""])[0][:300]
            warnings.warn(f"{self.model.name} {self.task} {_params_text(params)}: {type(e).__name__}: {first}",
                          stacklevel=2)
            cell = self.cell(params, status="error", message=f"{type(e).__name__}: {first}")
        cell.seconds = round(time.perf_counter() - t0, 4)
        return cell

    def admit(self, context: int, batch: int, detail: str = "") -> tuple[int, str | None]:
        """``(batch to use, None)``, or ``(0, reason)`` when the model cannot hold a ``context``-token context
        (``detail`` says what makes up the context, for the message)."""
        m = self.model
        what = f"{context} tokens" + (f" ({detail})" if detail else "")
        if m.max_context is not None and context > m.max_context:
            return 0, f"refused: a context of {what} exceeds the max context of {m.name} ({m.max_context} tokens)"
        budget = self.options.memory_budget_gb
        if m.state_growth == "growing" and budget is not None:
            if budget == "auto":
                budget, which = auto_memory_budget_gb(m.device), "automatic memory budget"
            else:
                which = "memory budget"
            per_seq = m.bytes_per_token() * context
            fit = int(budget * 2**30 // per_seq) if per_seq > 0 else batch
            if fit < 1:
                return 0, (f"refused: the state of {m.name} grows with the context, to ~{_gib(per_seq)} for one "
                           f"sequence of {what}, over the {which} of {budget:.3g} GiB")
            batch = min(batch, fit)
        return batch, None


def auto_memory_budget_gb(device: torch.device | str) -> float:
    """80% of the memory of ``device``: the GPU's total memory for CUDA, the machine's physical RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system: no automatic limit
            return float("inf")
    return 0.8 * total / 2**30


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _stream(
    run: _Run, ids: Tensor, state: Any, on_logits: Callable[[int, Tensor], None] | None = None
) -> tuple[Tensor, Any]:
    """Feed ``ids [B, T]`` through the model ``stream_chunk`` tokens per call, carrying ``state``.

    ``on_logits(start, logits [B, c, V])`` sees each call's logits (for positions ``start .. start + c - 1``).
    Returns ``(logits at the last position [B, V], state)``.
    """
    model = run.model
    B, T = ids.shape
    step = run.options.stream_chunk or T
    last = None
    for s in range(0, T, step):
        x = ids[:, s : s + step].to(model.device)  # [B, c]
        logits, state = model.forward(x, state)
        if logits.dim() != 3 or logits.shape[:2] != x.shape:
            raise ValueError(f"{model.name}.forward returned logits of shape {tuple(logits.shape)} for ids of shape "
                             f"{tuple(x.shape)}; expected [B, T, V] = [{x.shape[0]}, {x.shape[1]}, V]")
        _check_finite(model, logits, s)
        if on_logits is not None:
            on_logits(s, logits)
        last = logits[:, -1]
        run.bar.update(x.numel())
    return last, state


def _check_finite(model: Any, logits: Tensor, start: int) -> None:
    """NaN logits would still give an argmax (a silent wrong answer): the cell reports an error instead."""
    if not bool(torch.isfinite(logits).all()):
        end = start + logits.shape[1] - 1
        raise FloatingPointError(f"{model.name} returned non-finite logits for positions {start}..{end} (its state "
                                 "overflowed)")


def _per_sequence_state(state: Any, batch: int) -> dict[str, int]:
    """``state_numel``, ``state_bytes`` and ``state_storage_bytes`` (see :func:`state_size`) per sequence."""
    size = state_size(state)
    return {"state_numel": size.numel // batch, "state_bytes": size.nbytes // batch,
            "state_storage_bytes": size.storage_bytes // batch}


def _max_sizes(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: max(a.get(k, 0), v) for k, v in b.items()}


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


# -- MQAR: teacher-forced accuracy at the query positions -------------------------------------------------------------

def _eval_mqar(run: _Run) -> list[Cell]:
    cfg: MQARConfig = run.config
    params = {"seq_len": cfg.seq_len, "num_kv_pairs": cfg.num_kv_pairs, "vocab_size": cfg.vocab_size}
    return [run.guarded(params, lambda: _mqar_cell(run, cfg, params))]


def _mqar_cell(run: _Run, cfg: MQARConfig, params: dict[str, Any]) -> Cell:
    m = run.model
    if m.vocab_size < cfg.vocab_size:
        run.bar.update(cfg.num_examples * cfg.seq_len)
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, the "
                                                          f"task uses {cfg.vocab_size}")
    batch, reason = run.admit(cfg.seq_len, run.options.batch_size)
    if reason:
        run.bar.update(cfg.num_examples * cfg.seq_len)
        return run.cell(params, status="refused", message=reason)
    inputs, labels = cfg.build(run.seed)  # [N, L] each
    pred = torch.zeros_like(inputs)  # [N, L]: argmax after each token
    sizes: dict[str, int] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in _batches(inputs.shape[0], batch):

            def keep(start: int, logits: Tensor, rows=rows) -> None:
                pred[rows, start : start + logits.shape[1]] = logits.argmax(-1).cpu()

            _, state = _stream(run, inputs[rows], m.init_state(rows.stop - rows.start), keep)
            sizes = _max_sizes(sizes, _per_sequence_state(state, rows.stop - rows.start))
    seconds = time.perf_counter() - t0
    scores = mqar_recall_metrics(pred, inputs, labels, cfg.num_kv_pairs, run.reach, vocab_size=cfg.vocab_size)
    scores = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in scores.items()}  # empty buckets
    return run.cell(params, metrics={
        **scores, "examples": cfg.num_examples, **sizes,
        "tokens_per_second": round(inputs.numel() / max(seconds, 1e-9), 1), "batch_size": batch,
    })


def model_reach(model: StatefulLM) -> int | None:
    """How far back a model with sliding-window attention sees through attention alone: ``n_layers * (window - 1)``
    for mnemos' sliding-window variants (swa, mag, mal: their registry entries' ``reach``, read from
    ``model.config``); None for any other model."""
    config = getattr(model, "config", None)
    variant = getattr(config, "variant", None)
    spec = VARIANT_REGISTRY.get(variant) if isinstance(variant, str) else None
    if spec is None or not all(isinstance(getattr(config, k, None), int) for k in ("n_layers", "window")):
        return None
    return spec.reach(config)


def _mqar_reaches(models: Sequence[StatefulLM], reach: int | str | None) -> list[int | None]:
    """Each model's near / far split for ``EvalOptions.mqar_reach`` (see there)."""
    if reach != "auto":
        return [reach] * len(models)
    own = [model_reach(m) for m in models]
    windowed = {r for r in own if r is not None}
    return [windowed.pop()] * len(models) if len(windowed) == 1 else own


MQAR_TASK_KEYS = ("vocab_size", "seq_len", "num_kv_pairs", "power_a", "noise")


def saved_mqar_task(model_specs: Sequence[str], keys: Sequence[str] = MQAR_TASK_KEYS) -> dict[str, Any]:
    """The MQAR settings (those of ``keys`` that were saved) the checkpoints among ``model_specs`` were trained on,
    from each checkpoint's run config (``config.json``, else ``trainer.pt``) whose ``task.kind`` is mqar. Other
    specs (variants, baselines, LM runs) add nothing; {} when none has any. Checkpoints that disagree on one of
    ``keys`` are an error naming them."""
    found: dict[str, tuple[Any, str]] = {}
    for spec in model_specs:
        path = Path(spec)
        if not (path.is_dir() and (path / "trainer.pt").is_file()):
            continue
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
        config = config or read_trainer_state(path).get("config") or {}
        task = config.get("task") if isinstance(config, dict) else None
        if not isinstance(task, dict) or task.get("kind", "mqar") != "mqar":
            continue
        for key in keys:
            if key not in task:
                continue
            if key in found and found[key][0] != task[key]:
                raise ValueError(f"the checkpoints were trained on different MQAR tasks: task.{key} is "
                                 f"{found[key][0]!r} in {found[key][1]} and {task[key]!r} in {spec}; give the task "
                                 "explicitly (--vocab-size, --pairs L:K, --power-a, --noise)")
            found.setdefault(key, (task[key], spec))
    return {k: v for k, (v, _) in found.items()}


# -- NIAH, BABILong, passkey capacity: greedy decoding and exact match -----------------------------------------------

Sample = Union[NIAHSample, BABILongSample]


def _prompt_ids(model: StatefulLM, sample: Sample) -> Tensor:
    if model.tokenizer is None:
        return sample.input_ids
    return torch.tensor(model.encode_prompt(sample.prompt), dtype=torch.int64)


def _answer_tokens(model: StatefulLM, answer: str) -> int:
    text = " " + answer
    return len(text.encode("utf-8")) if model.tokenizer is None else len(model.tokenizer.encode(text))


def _decode(model: StatefulLM, ids: list[int]) -> str:
    if model.tokenizer is None:  # byte ids; an id beyond the bytes (a special, or a larger vocab) breaks the word
        return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")
    return model.tokenizer.decode(ids)


def _generation_cell(run: _Run, samples: Sequence[Sample], params: dict[str, Any]) -> Cell:
    """Greedy-decode an answer after every prompt and score it with :func:`mnemos.data.exact_match`.

    Each answer gets as many new tokens as ``" " + answer`` has, plus 2, so that a longer wrong answer
    ("714321" for "71432") shows as wrong rather than being cut to the right length.
    """
    m = run.model
    nominal = sum(s.length for s in samples)
    if m.tokenizer is None and m.vocab_size < 256:
        run.bar.update(nominal)
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, fewer "
                                                          "than the 256 byte tokens of the text tasks")
    prompts = [_prompt_ids(m, s) for s in samples]
    n_new = max(_answer_tokens(m, s.answer) for s in samples) + 2
    longest_prompt = max(p.numel() for p in prompts)
    longest = longest_prompt + n_new - 1  # the last new token is never fed back
    batch, reason = run.admit(longest, run.options.batch_size, f"{longest_prompt} prompt + {n_new - 1} generated")
    if reason:
        run.bar.update(nominal)
        return run.cell(params, status="refused", message=reason)

    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.numel(), []).append(i)
    predictions: list[str] = [""] * len(samples)
    sizes: dict[str, int] = {}
    fed = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for idx in by_length.values():
            for rows in _batches(len(idx), batch):
                chosen = idx[rows]
                ids = torch.stack([prompts[i] for i in chosen])  # [b, T]
                new, size = _greedy(run, ids, n_new)
                sizes = _max_sizes(sizes, size)
                fed += ids.numel() + new.numel()
                for i, row in zip(chosen, new.tolist(), strict=True):
                    predictions[i] = _decode(m, row)
    seconds = time.perf_counter() - t0
    hits = [exact_match(p, s.answer) for p, s in zip(predictions, samples, strict=True)]
    cell = run.cell(params, metrics={
        "accuracy": sum(hits) / len(hits), "correct": sum(hits), "n": len(hits),
        "tokens": max(p.numel() for p in prompts), **sizes,
        "tokens_per_second": round(fed / max(seconds, 1e-9), 1), "batch_size": batch,
    })
    if run.options.keep_samples:
        for s, p, h, ids in zip(samples, predictions, hits, prompts, strict=True):
            rec = {"answer": s.answer, "prediction": p, "correct": h, "tokens": ids.numel()}
            if isinstance(s, NIAHSample):
                rec["needle_depth"] = round(s.needle_depth, 4)
            cell.samples.append(rec)
    return cell


def _greedy(run: _Run, ids: Tensor, n_new: int) -> tuple[Tensor, dict[str, int]]:
    """Stream the prompts ``ids [B, T]``, then take ``n_new`` argmax tokens -> (``[B, n_new]``, state size)."""
    m = run.model
    B = ids.shape[0]
    last, state = _stream(run, ids, m.init_state(B))
    size = _per_sequence_state(state, B)
    out = []
    for i in range(n_new):
        nxt = last.argmax(-1)  # [B]
        out.append(nxt.cpu())
        if i + 1 < n_new:
            logits, state = m.forward(nxt[:, None].to(m.device), state)  # [B, 1, V]
            _check_finite(m, logits, ids.shape[1] + i)
            last = logits[:, -1]
    return torch.stack(out, dim=1), size  # [B, n_new]


def _eval_niah(run: _Run) -> list[Cell]:
    cfg: NIAHConfig = run.config
    cells = []
    for length in cfg.lengths:
        for depth in cfg.depths:
            one = dataclasses.replace(cfg, lengths=(length,), depths=(depth,))  # same samples as the full grid
            params = {"kind": cfg.kind, "length": length, "depth": depth}
            cells.append(run.guarded(params,
                                     lambda one=one, params=params: _generation_cell(run, one.build(run.seed), params)))
    return cells


def _eval_babilong(run: _Run) -> list[Cell]:
    cfg: BABILongConfig = run.config
    cells = []
    for length in cfg.lengths:
        one = dataclasses.replace(cfg, lengths=(length,))
        params = {"qa": cfg.task, "length": length}
        cells.append(run.guarded(params,
                                 lambda one=one, params=params: _generation_cell(run, one.build(run.seed), params)))
    return cells


def _eval_capacity(run: _Run) -> list[Cell]:
    cfg: PasskeyCapacityConfig = run.config
    cells = []
    for length in cfg.lengths:
        one = dataclasses.replace(cfg, lengths=(length,))
        params = {"length": length}
        cells.append(run.guarded(
            params,
            lambda one=one, length=length, params=params: _generation_cell(run, one.build(run.seed)[length], params),
        ))
    return cells


# -- LM: loss and perplexity on the val split ----------------------------------------------------------------------

def _eval_lm(run: _Run) -> list[Cell]:
    cfg: LMDataConfig = run.config
    params = {"seq_len": cfg.seq_len, "tokenizer": cfg.tokenizer}
    return [run.guarded(params, lambda: _lm_cell(run, cfg, params))]


def _lm_cell(run: _Run, cfg: LMDataConfig, params: dict[str, Any]) -> Cell:
    m = run.model
    data = cfg.build(run.seed)
    tokens = data.val
    if m.tokenizer is not None:  # score the same text in the model's own tokens
        tokens = torch.tensor(m.tokenizer.encode(data.tokenizer.decode(tokens.tolist())), dtype=torch.int64)
    elif m.vocab_size < data.tokenizer.vocab_size:
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, the "
                                                          f"{cfg.tokenizer} tokenizer {data.tokenizer.vocab_size}")
    T = cfg.seq_len
    n_windows = (tokens.numel() - 1) // T
    if run.options.lm_max_windows is not None:
        n_windows = min(n_windows, run.options.lm_max_windows)
    if n_windows < 1:
        return run.cell(params, status="refused",
                        message=f"refused: the val split has {tokens.numel()} tokens, fewer than seq_len + 1 = {T + 1}")
    batch, reason = run.admit(T, run.options.batch_size)
    if reason:
        return run.cell(params, status="refused", message=reason)
    starts = torch.arange(n_windows) * T  # non-overlapping windows, in order
    windows = tokens[starts[:, None] + torch.arange(T + 1)]  # [W, T + 1]
    loss_sum = torch.zeros((), dtype=torch.float64)
    sizes: dict[str, int] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in _batches(n_windows, batch):
            x, y = windows[rows, :-1], windows[rows, 1:]  # [b, T] each

            def score(start: int, logits: Tensor, y=y) -> None:
                nonlocal loss_sum
                target = y[:, start : start + logits.shape[1]].to(logits.device)  # [b, c]
                logits = logits if logits.dtype == torch.float64 else logits.float()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
                loss_sum = loss_sum + ce.double().cpu()

            _, state = _stream(run, x, m.init_state(x.shape[0]), score)
            sizes = _max_sizes(sizes, _per_sequence_state(state, x.shape[0]))
    seconds = time.perf_counter() - t0
    count = n_windows * T
    loss = float(loss_sum) / count
    return run.cell(params, metrics={
        "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
        "tokens": count, "windows": n_windows, **sizes,
        "tokens_per_second": round(count / max(seconds, 1e-9), 1), "batch_size": batch,
    })


def _task_tokens(config: TaskConfig, options: EvalOptions) -> int:
    """Roughly how many tokens evaluating ``config`` feeds (the progress bar's total)."""
    if isinstance(config, MQARConfig):
        return config.num_examples * config.seq_len
    if isinstance(config, NIAHConfig):
        return sum(config.lengths) * len(config.depths) * config.samples_per_cell
    if isinstance(config, BABILongConfig):
        return sum(config.lengths) * config.samples_per_length
    if isinstance(config, PasskeyCapacityConfig):
        return sum(config.lengths) * config.samples_per_length
    return config.seq_len * (options.lm_max_windows or 0)


_EVALUATORS: dict[type, Callable[[_Run], list[Cell]]] = {
    MQARConfig: _eval_mqar,
    NIAHConfig: _eval_niah,
    BABILongConfig: _eval_babilong,
    PasskeyCapacityConfig: _eval_capacity,
    LMDataConfig: _eval_lm,
}
