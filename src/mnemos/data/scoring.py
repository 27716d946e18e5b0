"""Scoring for the recall tasks: exact match of text answers (NIAH, BABILong, passkey) and MQAR's recall metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mnemos.data.mqar import IGNORE_INDEX

__all__ = ["exact_match", "exact_match_accuracy", "mqar_recall_metrics"]

_TRAILING = ".,;:!?\"')]}"
_CLOSING = ".,;:!?"  # sentence punctuation that ends an answer written straight on (" 71432.0": the answer, closed)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a model's continuation answers exactly.

    The continuation is read up to its first whitespace after leading whitespace is skipped, trailing sentence
    punctuation (``.,;:!?"')]}``) is removed, and the rest must equal ``answer`` character for character (case
    included). So ``" 71432. Remember it."`` matches ``"71432"``, while ``"714321"`` and ``"Kitchen"`` for
    ``"kitchen"`` do not. An answer closed by sentence punctuation (``.,;:!?``) ends there even when the text goes on
    without a space: ``" 71432.0"`` matches ``"71432"`` (a model trained on ``" " + answer + "."``, as ``mnemos
    train`` teaches the retrieval tasks, never learnt what follows the period). The answers of mnemos' tasks hold no
    such punctuation (numbers, words), so this cannot turn a wrong answer into a right one.

    >>> exact_match(" 71432. Remember it.", "71432"), exact_match("714321", "71432"), exact_match(" 71432.0", "71432")
    (True, False, True)
    """
    if not answer or answer != answer.strip() or any(c.isspace() for c in answer):
        raise ValueError(f"answer must be a non-empty string without whitespace, got {answer!r}")
    words = prediction.split(maxsplit=1)
    if not words:
        return False
    word = words[0]
    closed = len(word) > len(answer) and word.startswith(answer) and word[len(answer)] in _CLOSING
    return word.rstrip(_TRAILING) == answer or closed


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean of :func:`exact_match` over paired predictions and answers."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need as many predictions as answers (> 0), got {len(predictions)} and {len(answers)}")
    return sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)


def mqar_recall_metrics(
    pred: Tensor, inputs: Tensor, labels: Tensor, num_kv_pairs: int, reach: int | None = None, *,
    vocab_size: int | None = None,
) -> dict[str, float | int | None]:
    """MQAR's recall at the query positions, split so that a model cannot look better than it is.

    ``pred``, ``inputs`` and ``labels`` are ``[N, L]`` token ids (``pred[n, t]``: the model's argmax after reading
    ``inputs[n, t]``); the queries are the positions whose label is not ``IGNORE_INDEX`` (a noise token equal to a
    key is not a query). Each query is mapped to the context position of its key: the first of the sample's key slots
    ``0, 2, ..., 2K - 2`` holding that token (its value sits one position later).

    Returns (rates are ``nan`` when nothing is counted):

    - ``accuracy``, ``correct``, ``n``: over all queries;
    - ``context_value_rate``, ``context_values``: the share (count) of predictions that are one of the sample's K
      context values, right or wrong. Beside it ``any_value_level = 1 / K``: the accuracy of a model that answers
      every query with a random context value (rate 1, accuracy 1 / K). A rate near 1 with accuracy near 1 / K means
      the model learnt *which tokens* answer, not which answer goes with which key;
    - ``chance`` (when ``vocab_size`` is given): 1 / (number of value ids, ``V - V // 2``), a uniform guess's accuracy;
    - with ``reach`` (an int): ``reach``, ``near_accuracy`` / ``near_correct`` / ``n_near`` for queries whose key
      lies at most ``reach`` tokens back (distance = query position - key position), ``far_accuracy`` /
      ``far_correct`` / ``n_far`` beyond it, and ``far_context_value_rate`` / ``far_context_values``. For a stack of
      ``n_layers`` sliding windows of ``W`` tokens the reach is ``n_layers * (W - 1)``: nothing further back can
      reach the query through attention alone.

    >>> inputs = torch.tensor([[3, 9, 5, 8, 1, 5, 0, 3]])  # pairs 3->9, 5->8; queries: 5 at t=5, 3 at t=7
    >>> labels = torch.tensor([[-100, -100, -100, -100, -100, 8, -100, 9]])
    >>> m = mqar_recall_metrics(torch.tensor([[0, 0, 0, 0, 0, 8, 0, 8]]), inputs, labels, 2, reach=4)
    >>> m["accuracy"], m["near_accuracy"], m["far_accuracy"], m["context_value_rate"], m["any_value_level"]
    (0.5, 1.0, 0.0, 1.0, 0.5)
    """
    if pred.shape != inputs.shape or labels.shape != inputs.shape or inputs.dim() != 2:
        raise ValueError(f"pred, inputs and labels must all be [N, L], got {tuple(pred.shape)}, "
                         f"{tuple(inputs.shape)}, {tuple(labels.shape)}")
    K = num_kv_pairs
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= inputs.shape[1] // 2:
        raise ValueError(f"num_kv_pairs must be an int in [1, L / 2], got {K!r} for L = {inputs.shape[1]}")
    if reach is not None and (isinstance(reach, bool) or not isinstance(reach, int) or reach < 0):
        raise ValueError(f"reach must be an int >= 0 or None, got {reach!r}")
    pred, inputs, labels = pred.cpu(), inputs.cpu(), labels.cpu()
    rows, t = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # [M] each: the queries, row-major
    keys, values = inputs[:, 0 : 2 * K : 2], inputs[:, 1 : 2 * K : 2]  # [N, K] each
    slot = _first_in_row(keys, rows, inputs[rows, t])  # [M]: which pair each query asks for
    if bool((slot < 0).any()):
        i = int((slot < 0).nonzero()[0])
        raise ValueError(f"the query at row {int(rows[i])}, position {int(t[i])} (token {int(inputs[rows[i], t[i]])}) "
                         f"is none of its row's {K} context keys: not MQAR data with num_kv_pairs={K}")
    p = pred[rows, t]  # [M]
    hit = p == labels[rows, t]  # [M]
    in_context = _first_in_row(values, rows, p) >= 0  # [M]: answered with one of the sample's context values
    out: dict[str, float | int | None] = {
        "accuracy": _rate(hit), "correct": int(hit.sum()), "n": int(hit.numel()),
        "context_value_rate": _rate(in_context), "context_values": int(in_context.sum()),
        "any_value_level": 1.0 / K,
    }
    if vocab_size is not None:
        out["chance"] = 1.0 / (vocab_size - vocab_size // 2)
    if reach is not None:
        near = t - 2 * slot <= reach  # [M]
        far = ~near
        out.update({
            "reach": reach,
            "near_accuracy": _rate(hit[near]), "near_correct": int(hit[near].sum()), "n_near": int(near.sum()),
            "far_accuracy": _rate(hit[far]), "far_correct": int(hit[far].sum()), "n_far": int(far.sum()),
            "far_context_value_rate": _rate(in_context[far]), "far_context_values": int(in_context[far].sum()),
        })
    return out


def _rate(mask: Tensor) -> float:
    return int(mask.sum()) / mask.numel() if mask.numel() else math.nan


def _first_in_row(table: Tensor, rows: Tensor, tokens: Tensor) -> Tensor:
    """For each i, the first column j with ``table[rows[i], j] == tokens[i]``, or -1 (``table [N, K]``; vectorised:
    one sort and one searchsorted over the rows laid end to end)."""
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    lo = int(min(table.min(), tokens.min()))
    span = int(max(table.max(), tokens.max())) - lo + 1
    offset = torch.arange(table.shape[0], dtype=torch.int64)[:, None] * span  # [N, 1]: row n's tokens in its own band
    flat, order = (table - lo + offset).flatten().sort(stable=True)  # equal tokens keep their column order
    needle = tokens - lo + offset[rows, 0]  # [M]
    pos = torch.searchsorted(flat, needle).clamp_max(flat.numel() - 1)  # [M]: the first equal, if any
    found = flat[pos] == needle
    return torch.where(found, order[pos] % table.shape[1], torch.full_like(pos, -1))
