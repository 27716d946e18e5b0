"""Exact-match scoring for the recall tasks, whose answers are single whitespace-free strings."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["exact_match", "exact_match_accuracy"]

_TRAILING = ".,;:!?\"')]}"


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a model's continuation answers exactly.

    The continuation is read up to its first whitespace after leading whitespace is skipped, trailing sentence
    punctuation (``.,;:!?"')]}``) is removed, and the rest must equal ``answer`` character for character (case
    included). So ``" 71432. Remember it."`` matches ``"71432"``, while ``"714321"`` and ``"Kitchen"`` for
    ``"kitchen"`` do not.

    >>> exact_match(" 71432. Remember it.", "71432"), exact_match("714321", "71432")
    (True, False)
    """
    if not answer or answer != answer.strip() or any(c.isspace() for c in answer):
        raise ValueError(f"answer must be a non-empty string without whitespace, got {answer!r}")
    words = prediction.split(maxsplit=1)
    return bool(words) and words[0].rstrip(_TRAILING) == answer


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean of :func:`exact_match` over paired predictions and answers."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need as many predictions as answers (> 0), got {len(predictions)} and {len(answers)}")
    return sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)
