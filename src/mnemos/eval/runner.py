"""What every task's evaluation shares: the options (:class:`EvalOptions`), one (model, task) evaluation
(:class:`Run`: its cells, errors kept in them, contexts a model cannot hold refused), feeding a context through a model
in chunks with the state carried (:func:`stream`), and greedy decoding scored by exact match
(:func:`generation_cell`, and its pieces :func:`prompt_ids`, :func:`continuation_ids`, :func:`greedy_continue`
that the multi-turn NIAH cells reuse), with :class:`GenerationTask`, the base of the tasks that decode one answer
per prompt over a grid of lengths (NIAH, BABILong, passkey capacity).

The tasks themselves are in :mod:`mnemos.eval.tasks`; :mod:`mnemos.eval.harness` runs them.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from mnemos.data import BABILongSample, NIAHSample, exact_match
from mnemos.eval._progress import ProgressBar
from mnemos.eval.jrt import check_jrt, jrt_description, jrt_text, repeat_context
from mnemos.eval.registry import EvalTask, EvalTaskConfig, config_to_dict, task_of
from mnemos.eval.results import Cell, environment
from mnemos.eval.stateful import StatefulLM, state_size
from mnemos.layers.kv_cache import KVCache

__all__ = ["EvalOptions", "GenerationTask", "Run", "TURN_MODES", "auto_memory_budget_gb", "batches",
           "continuation_ids", "decode_ids", "generation_cell", "greedy_continue", "kv_caches", "max_sizes",
           "new_token_count", "per_sequence_state", "prompt_ids", "stream", "text_vocab_refusal"]

_OOM_ERRORS = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
TURN_MODES = ("shared", "fresh")  # the shared-context, many-queries modes (mnemos.eval.turns)


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
            reach ``n_layers * (window - 1)`` of its sliding-window models (swa, mag, mal;
            :func:`mnemos.eval.tasks.mqar.model_reach`) when they agree; when they disagree each of them is split
            at its own and the others not at all; no split when none has a window. None: no split.
        mqar_turns: MQAR: also run the shared-context, many-queries mode (SCBench), one cell per mode given:
            ``"shared"`` prefills the context up to the first query once and asks the queries in turn, each reusing
            the (compressed) state; ``"fresh"`` gives each query its own prefill of everything before it. Both record
            accuracy by turn (:mod:`mnemos.eval.tasks.mqar`). Empty: not run.
        niah_turns: NIAH: the same modes for the questions of a (multi-query) NIAH prompt: ``"shared"`` prefills the
            prompt up to the first question once, then asks the questions in turn, each question and the model's
            greedy answer staying in the (compressed) state; ``"fresh"`` prefills that same dialogue up to each
            question anew (:mod:`mnemos.eval.tasks.niah`). Empty: not run.
        jrt: also run every task with JRT-Prompt, its context repeated before its queries (:mod:`mnemos.eval.jrt`):
            each model's plain cells, then its JRT cells, under the name ``"<name> (JRT-Prompt)"``. A task without a
            separable context (``EvalTask.jrt`` None: LM) is refused with an error.
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
    mqar_turns: tuple[str, ...] = ()
    niah_turns: tuple[str, ...] = ()
    jrt: bool = False

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
        for name in ("mqar_turns", "niah_turns"):
            turns = getattr(self, name)
            if not isinstance(turns, tuple) or any(t not in TURN_MODES for t in turns) or len(set(turns)) != len(turns):
                raise ValueError(f"{name} must be a tuple of distinct modes 'shared' / 'fresh', got {turns!r}")
        if not isinstance(self.jrt, bool):
            raise ValueError(f"jrt must be a bool, got {self.jrt!r}")




class Run:
    """One (model, task config) evaluation: what every cell of it shares. ``jrt``: the JRT-Prompt run (the task
    repeats its context before its queries; the cells' model is ``"<name> (JRT-Prompt)"``, :mod:`mnemos.eval.jrt`)."""

    def __init__(self, model: StatefulLM, config: EvalTaskConfig, seed: int, options: EvalOptions, bar: ProgressBar,
                 peers: Sequence[StatefulLM] = (), *, jrt: bool = False):
        self.model, self.config, self.seed, self.options, self.bar = model, config, seed, options, bar
        self.peers = tuple(peers) or (model,)  # every model of the evaluation (MQAR's "auto" split reads them)
        self.task = task_of(config).name
        self.jrt = jrt
        if jrt:
            check_jrt([task_of(config)])
        self.description = jrt_description(model.describe()) if jrt else model.describe()
        self.description.setdefault("kv_policy", None)  # every cell says which KV policy ran (None: the model's own)
        self.versions = environment(model.device)
        self.task_config = config_to_dict(config)
        # tuples as lists, as JSON gives them back (a saved cell then equals the one in memory)
        self.option_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}

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


def stream(
    run: Run, ids: Tensor, state: Any, on_logits: Callable[[int, Tensor], None] | None = None
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
        check_finite(model, logits, s)
        if on_logits is not None:
            on_logits(s, logits)
        last = logits[:, -1]
        run.bar.update(x.numel())
    return last, state


def check_finite(model: Any, logits: Tensor, start: int) -> None:
    """NaN logits would still give an argmax (a silent wrong answer): the cell reports an error instead."""
    if not bool(torch.isfinite(logits).all()):
        end = start + logits.shape[1] - 1
        raise FloatingPointError(f"{model.name} returned non-finite logits for positions {start}..{end} (its state "
                                 "overflowed)")


def per_sequence_state(state: Any, batch: int) -> dict[str, int]:
    """``state_numel``, ``state_bytes`` and ``state_storage_bytes`` (see :func:`state_size`) per sequence, and
    ``kv_cache_bytes`` when the state holds KV caches (:class:`mnemos.layers.KVCache`, a policy's included): the sum
    of their ``nbytes``, the bytes they really hold (packed codes, scales, indices and positions included; the
    attention part of ``state_bytes``, all of it for a pure attention model). A retrieval tier's offload store
    (``KVCache.tier_nbytes()["offloaded"]``, :mod:`mnemos.kv.retrieval`) is left out of them (and of
    ``state_numel``) and recorded beside them as ``kv_offloaded_bytes``."""
    size = state_size(state)
    caches = kv_caches(state)
    tiers = [(c, c.tier_nbytes().get("offloaded", 0)) for c in caches]
    off = sum(o for _, o in tiers)
    off_numel = sum(o // c.dtype.itemsize for c, o in tiers if o)
    out = {"state_numel": (size.numel - off_numel) // batch, "state_bytes": (size.nbytes - off) // batch,
           "state_storage_bytes": size.storage_bytes // batch}
    if caches:
        out["kv_cache_bytes"] = (sum(c.nbytes for c in caches) - off) // batch
    if off:
        out["kv_offloaded_bytes"] = off // batch
    return out


def kv_caches(state: Any) -> list[KVCache]:
    """Every :class:`~mnemos.layers.KVCache` reachable from ``state`` (through containers and object attributes, as
    :func:`state_size` walks), each once."""
    found: dict[int, KVCache] = {}
    seen: set[int] = set()
    stack = [state]
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (bool, int, float, str, bytes, Tensor, torch.nn.Module)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, KVCache):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
    return list(found.values())


def max_sizes(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: max(a.get(k, 0), v) for k, v in b.items()}


def batches(n: int, size: int):
    """Slices of ``range(n)`` of at most ``size`` each."""
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))



Sample = Union[NIAHSample, BABILongSample]


def prompt_ids(model: StatefulLM, sample: Sample, jrt: bool = False) -> Tensor:
    """The prompt's token ids: the sample's byte tokens, or the model's tokenizer's. ``jrt``: the JRT prompt, the
    context (everything before the question) twice, then the question (:mod:`mnemos.eval.jrt`)."""
    if model.tokenizer is None:
        if not jrt:
            return sample.input_ids
        question = list(sample.question.encode("utf-8"))  # byte tokens: one per UTF-8 byte
        if sample.input_ids[-len(question):].tolist() != question:
            raise ValueError("JRT-Prompt: the sample's token ids do not end with its question's bytes")
        return repeat_context(sample.input_ids, sample.input_ids.numel() - len(question))[0]
    text = jrt_text(sample.prompt, sample.question) if jrt else sample.prompt
    return torch.tensor(model.encode_prompt(text), dtype=torch.int64)



def continuation_ids(model: StatefulLM, text: str) -> Tensor:
    """The token ids of ``text`` continuing a sequence (no BOS): its UTF-8 bytes, or the model's tokenizer's."""
    ids = list(text.encode("utf-8")) if model.tokenizer is None else model.tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.int64)


def _answer_tokens(model: StatefulLM, answer: str) -> int:
    text = " " + answer
    return len(text.encode("utf-8")) if model.tokenizer is None else len(model.tokenizer.encode(text))


def new_token_count(model: StatefulLM, answers: Iterable[str]) -> int:
    """How many tokens greedy decoding takes for any of ``answers``: the longest ``" " + answer``, plus 2 (so a
    longer wrong answer shows as wrong rather than being cut to the right length)."""
    return max(_answer_tokens(model, a) for a in answers) + 2


def decode_ids(model: StatefulLM, ids: list[int]) -> str:
    """Generated token ids as text."""
    if model.tokenizer is None:  # byte ids; an id beyond the bytes (a special, or a larger vocab) breaks the word
        return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")
    return model.tokenizer.decode(ids)


def text_vocab_refusal(run: Run, params: dict[str, Any], nominal: int) -> Cell | None:
    """The refused cell for a byte-token model with fewer than the 256 byte ids of the text tasks, else None."""
    m = run.model
    if m.tokenizer is None and m.vocab_size < 256:
        run.bar.update(nominal)
        return run.cell(params, status="refused", message=f"refused: {m.name} has {m.vocab_size} token ids, fewer "
                                                          "than the 256 byte tokens of the text tasks")
    return None


def generation_cell(run: Run, samples: Sequence[Sample], params: dict[str, Any]) -> Cell:
    """Greedy-decode an answer after every prompt and score it with :func:`mnemos.data.exact_match`.

    Each answer gets as many new tokens as ``" " + answer`` has, plus 2, so that a longer wrong answer
    ("714321" for "71432") shows as wrong rather than being cut to the right length.
    """
    m = run.model
    nominal = sum(s.length for s in samples)
    refused = text_vocab_refusal(run, params, nominal)
    if refused is not None:
        return refused
    prompts = [prompt_ids(m, s, run.jrt) for s in samples]
    n_new = new_token_count(m, (s.answer for s in samples))
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
            for rows in batches(len(idx), batch):
                chosen = idx[rows]
                ids = torch.stack([prompts[i] for i in chosen])  # [b, T]
                new, size = _greedy(run, ids, n_new)
                sizes = max_sizes(sizes, size)
                fed += ids.numel() + new.numel()
                for i, row in zip(chosen, new.tolist(), strict=True):
                    predictions[i] = decode_ids(m, row)
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


def _greedy(run: Run, ids: Tensor, n_new: int) -> tuple[Tensor, dict[str, int]]:
    """Stream the prompts ``ids [B, T]``, then take ``n_new`` argmax tokens -> (``[B, n_new]``, state size)."""
    B = ids.shape[0]
    last, state = stream(run, ids, run.model.init_state(B))
    size = per_sequence_state(state, B)
    return greedy_continue(run, last, state, n_new, ids.shape[1])[0], size


def greedy_continue(run: Run, last: Tensor, state: Any, n_new: int, start: int) -> tuple[Tensor, Any]:
    """``n_new`` argmax tokens from the logits ``last [B, V]`` at position ``start - 1``, each but the last fed back
    (``n_new - 1`` calls of one token) -> (``[B, n_new]`` on the CPU, the state: the last token is not in it)."""
    m = run.model
    out = []
    for i in range(n_new):
        nxt = last.argmax(-1)  # [B]
        out.append(nxt.cpu())
        if i + 1 < n_new:
            logits, state = m.forward(nxt[:, None].to(m.device), state)  # [B, 1, V]
            check_finite(m, logits, start + i)
            last = logits[:, -1]
    return torch.stack(out, dim=1), state  # [B, n_new]



class GenerationTask(EvalTask):
    """A task that greedy-decodes one answer per prompt and scores it by exact match, one cell per grid point.

    Subclasses give :meth:`grid` (the cells: their params and a config narrowed to that point, which builds the
    same samples as the full grid does there) and :meth:`samples`; :meth:`evaluate`, the loop over the grid, is this
    one. JRT-Prompt repeats each prompt's context, everything before its question (:func:`prompt_ids`).
    """

    jrt = "the prompt before its question (instruction, haystack and facts), twice, then the question"

    def grid(self, config: EvalTaskConfig) -> Iterable[tuple[dict[str, Any], EvalTaskConfig]]:
        raise NotImplementedError

    def samples(self, config: EvalTaskConfig, seed: int) -> Sequence[Sample]:
        """The samples of a config narrowed to one grid point (default: ``config.build(seed)``)."""
        return config.build(seed)

    def evaluate(self, run: Run) -> list[Cell]:
        return [run.guarded(params, lambda one=one, params=params: generation_cell(run, self.samples(one, run.seed),
                                                                                    params))
                for params, one in self.grid(run.config)]
