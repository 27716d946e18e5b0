"""JRT-Prompt ("Just read twice", Arora et al. 2024, arXiv 2407.05483): the context of a prompt appears twice, then
the queries, so that a model with a fixed-size state reads the context again knowing what it holds.

``mnemos eval TASK --jrt`` (``EvalOptions(jrt=True)``) runs every model on every task twice: as today (the plain
cells, unchanged), then with the JRT prompt. The JRT cells are the same cells of a model named ``"<name> (JRT-Prompt)"``
(its description adds ``jrt_prompt: true`` and ``jrt_base``, the plain name), so every table and figure shows them
as a row of their own beside the plain one, and ``report.md`` adds a section with the two side by side
(:func:`mnemos.eval.tables.jrt_section`).

What a task repeats is its own: ``EvalTask.jrt`` names it, None for a task without a context separable from its
queries, which ``--jrt`` refuses (an error naming the task, before any model runs). The one transform, shared by
every task, is :func:`repeat_context`: tokens ``c_0 .. c_{n-1} | q_0 .. q_{m-1}`` become
``c_0 .. c_{n-1} c_0 .. c_{n-1} | q_0 .. q_{m-1}``, the labels (where a task has them) moved with their tokens.

- MQAR: the context is the K key-value pairs, the first 2K tokens; the queries are everything after them (the queries
  among their noise). A sample of L tokens becomes L + 2K tokens; label i moves to i + 2K, so each answer is scored at
  the same query token, and the 2K new positions carry no label. The predictions are scored on the last L positions,
  aligned with the plain sample (:func:`jrt_mqar_predictions`): the near / far split (distance from the query to its
  key) is measured to the key's *second* copy, i.e. it is the plain sample's distance, and the reach means what it
  means without JRT. The shared-context mode (``--turns``) prefills both copies and the first query.
- S-NIAH, BABILong, passkey capacity (the generation tasks): the context is the prompt before its question
  (instruction, haystack with the needle or facts, and the blank line); the question follows the second copy.
  With byte tokens the ids are repeated (:func:`repeat_context`); with a model's tokenizer the text
  ``context + context + question`` is encoded (a BOS once).
- LM perplexity has no context apart from its predictions: refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mnemos.data import IGNORE_INDEX

__all__ = ["JRT_SUFFIX", "check_jrt", "jrt_description", "jrt_mqar", "jrt_mqar_predictions", "jrt_text",
           "repeat_context"]

JRT_SUFFIX = " (JRT-Prompt)"  # what a JRT cell's model name adds to the plain one


def repeat_context(ids: Tensor, n_context: int, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``ids [..., T]`` -> ``[..., T + n]``: the first ``n = n_context`` tokens twice, then the rest; ``labels``
    (same shape) move with their tokens, the n repeated positions taking ``IGNORE_INDEX``.

    >>> ids, labels = repeat_context(torch.tensor([4, 15, 7, 14, 7, 0]), 4, torch.tensor([-100] * 4 + [14, -100]))
    >>> ids.tolist(), labels.tolist()
    ([4, 15, 7, 14, 4, 15, 7, 14, 7, 0], [-100, -100, -100, -100, -100, -100, -100, -100, 14, -100])
    """
    T = ids.shape[-1]
    if isinstance(n_context, bool) or not isinstance(n_context, int) or not 0 < n_context <= T:
        raise ValueError(f"n_context must be an int in [1, {T}], got {n_context!r}")
    context = ids[..., :n_context]
    out = torch.cat([context, ids], dim=-1)
    if labels is None:
        return out, None
    if labels.shape != ids.shape:
        raise ValueError(f"labels must have the shape of ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
    blank = torch.full_like(labels[..., :n_context], IGNORE_INDEX)
    return out, torch.cat([blank, labels], dim=-1)


def jrt_mqar(inputs: Tensor, labels: Tensor, num_kv_pairs: int) -> tuple[Tensor, Tensor]:
    """MQAR's JRT prompt: the K pairs (the first 2K tokens) twice, then the queries; ``[N, L]`` -> ``[N, L + 2K]``,
    each label at its query token (position + 2K)."""
    ids, lab = repeat_context(inputs, 2 * num_kv_pairs, labels)
    return ids, lab


def jrt_mqar_predictions(pred: Tensor, num_kv_pairs: int) -> Tensor:
    """The predictions ``[N, L + 2K]`` on a JRT prompt, cut to the plain sample's L positions (drop the first copy of
    the context), to score against the plain ``inputs`` and ``labels``: the distances (near / far) are then those to
    the second copy."""
    return pred[:, 2 * num_kv_pairs :]


def jrt_text(prompt: str, question: str) -> str:
    """A text prompt ``context + question`` -> ``context + context + question``."""
    if not question or not prompt.endswith(question) or len(prompt) == len(question):
        raise ValueError("a JRT prompt needs a prompt that ends with its question after some context")
    context = prompt[: len(prompt) - len(question)]
    return context + context + question


def check_jrt(tasks: Iterable[Any]) -> None:
    """A ``ValueError`` naming the tasks JRT-Prompt cannot serve (their ``EvalTask.jrt`` is None)."""
    refused = []
    for task in tasks:
        if getattr(task, "jrt", None) is None:
            refused.append(task.name)
    if refused:
        names = ", ".join(dict.fromkeys(refused))
        raise ValueError(f"--jrt (JRT-Prompt, the context repeated before the queries): task {names} has no context "
                         f"separable from what it scores (language-model loss scores every token); run it without "
                         f"--jrt")


def jrt_description(description: dict[str, Any]) -> dict[str, Any]:
    """A model's cell description for its JRT cells: the name with :data:`JRT_SUFFIX`, ``jrt_prompt`` True and
    ``jrt_base`` the plain name."""
    d = dict(description)
    base = str(d.get("name", "model"))
    d.update(name=base + JRT_SUFFIX, jrt_prompt=True, jrt_base=base)
    return d
