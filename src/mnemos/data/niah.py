"""Single needle in a haystack (S-NIAH), as in RULER (Hsieh et al. 2024) and the passkey test of Mohtashami & Jaggi
(2023): one fact hidden at a chosen depth of a long text, asked for at the end; and its multi-query form (RULER's
``niah_multiquery``, ``num_queries`` Q > 1): Q needles of one kind with distinct keys at stratified depths, then Q
questions, one per needle.

Kinds:

- ``"passkey"``: a 5-digit pass key in a haystack of one repeated noise paragraph ("The grass is green. ...").
- ``"number"``: a 7-digit "special magic number" keyed by a word pair, in natural text (RULER ``niah_single_2``).
- ``"uuid"``: a "special magic uuid" keyed by a word pair, in natural text (RULER ``niah_single_3``).

Layout of a prompt (lengths in :class:`~mnemos.data.ByteTokenizer` tokens, i.e. UTF-8 bytes)::

    instruction + haystack[:p] + needle + " " + haystack[p:] + "\\n\\n" + question

The haystack is cut to make the whole prompt exactly the requested length; ``p`` is the sentence start nearest to
``depth * len(haystack)``. The question ends with "... is", so the answer is the model's continuation.

Multi-query (``num_queries`` Q >= 2)::

    instruction + haystack with needles n_0 .. n_{Q-1} (each + " ") + "\\n\\n" + question_1

Needle i (in text order) sits at the sentence start nearest to ``(i + depth) / Q`` of the haystack: one needle per
Q-th of the haystack, at the cell's depth within its stratum (Q = 1 is the single needle at ``depth``). Keys are
distinct (none inside another) and so are values; the questions are asked in a random order (drawn with the sample),
so that the k-th question's needle is not always the k-th from the top. ``length`` is the length of the prompt up to
and including the first question; each later question is asked after the answer to the previous one, as
:meth:`NIAHSample.follow_up` (``"\\n\\n" + question``) -- the multi-turn dialogue of ``mnemos eval niah --turns``
(:mod:`mnemos.eval.tasks.niah`) -- or on its own after the haystack, :meth:`NIAHSample.ask`. The passkey needle has
no key in the single-needle test; with Q >= 2 it names one ("The pass key for amber-otter is 71432. Remember it.
71432 is the pass key for amber-otter.") and so does its question. With Q = 1 every prompt is byte for byte the
single-needle one.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from mnemos.data._haystack import (
    check_int,
    check_lengths,
    insert_pieces,
    n_bytes,
    sample_rng,
    sentence_starts,
    snap,
)
from mnemos.data.corpus import filler_text, load_text
from mnemos.data.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mnemos.data.babilong import BABILongSample

__all__ = ["NIAHConfig", "NIAHKind", "NIAHQuery", "NIAHSample", "PASSKEY_NOISE", "make_niah_sample", "stack_input_ids"]

NIAHKind = Literal["passkey", "number", "uuid"]
_KIND_TAG = {"passkey": 1, "number": 2, "uuid": 3}  # part of every sample's seed, so kinds draw different streams

PASSKEY_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_PASSKEY_DIGITS = 5  # as in Mohtashami & Jaggi's passkey test
_NUMBER_DIGITS = 7  # as in RULER
_UUID_CHARS = 36
# Smallest haystack a prompt may have, so that a needle is always surrounded by some text to search.
MIN_HAYSTACK_TOKENS = 32

_INSTRUCTIONS = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it afterwards.\n\n",
    "number": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n",
    "uuid": "Some special magic uuids are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the uuids afterwards.\n\n",
}
_NEEDLES = {
    "passkey": "The pass key is {value}. Remember it. {value} is the pass key.",
    "number": "One of the special magic numbers for {key} is: {value}.",
    "uuid": "One of the special magic uuids for {key} is: {value}.",
}
_QUESTIONS = {
    "passkey": "What is the pass key? The pass key is",
    "number": "What is the special magic number for {key} mentioned in the provided text? "
              "The special magic number for {key} mentioned in the provided text is",
    "uuid": "What is the special magic uuid for {key} mentioned in the provided text? "
            "The special magic uuid for {key} mentioned in the provided text is",
}
_SEPARATOR = "\n\n"
# Multi-query passkey: the needles need keys to be told apart (the other kinds are keyed already).
_MULTI_INSTRUCTIONS = {
    **_INSTRUCTIONS,
    "passkey": "Some pass keys are hidden inside a lot of irrelevant text. Find them and memorize them. I will quiz "
               "you about them afterwards.\n\n",
}
_MULTI_NEEDLES = {**_NEEDLES, "passkey": "The pass key for {key} is {value}. Remember it. {value} is the pass key for "
                                         "{key}."}
_MULTI_QUESTIONS = {**_QUESTIONS, "passkey": "What is the pass key for {key}? The pass key for {key} is"}

# Needle keys are "adjective-noun" pairs (RULER draws random words the same way): 48 x 48 = 2304 keys.
_ADJECTIVES = (
    "amber", "ancient", "brave", "brisk", "calm", "clever", "copper", "crimson", "curious", "dusty", "eager",
    "elegant", "fierce", "fragile", "gentle", "gilded", "glossy", "hollow", "humble", "icy", "jolly", "keen",
    "lively", "lucky", "mellow", "misty", "modest", "nimble", "noble", "olive", "patient", "plucky", "quiet",
    "rapid", "rusty", "scarlet", "silent", "silver", "sleepy", "smooth", "sturdy", "tidy", "velvet", "vivid",
    "wary", "witty", "young", "zesty",
)
_NOUNS = (
    "anchor", "badger", "beacon", "canyon", "cello", "comet", "cricket", "dolphin", "ember", "falcon", "fern",
    "glacier", "harbor", "heron", "island", "jasmine", "kettle", "lantern", "lemur", "marble", "meadow", "nectar",
    "octopus", "orchard", "otter", "pebble", "pepper", "quarry", "raven", "ribbon", "saddle", "sparrow", "spruce",
    "summit", "teapot", "thistle", "tunnel", "umbrella", "valley", "violin", "walnut", "willow", "wizard", "yarrow",
    "zephyr", "walrus", "garnet", "lagoon",
)
_MAX_KEY_CHARS = max(map(len, _ADJECTIVES)) + 1 + max(map(len, _NOUNS))
_MAX_VALUE_CHARS = {"passkey": _PASSKEY_DIGITS, "number": _NUMBER_DIGITS, "uuid": _UUID_CHARS}
_MAX_DRAWS = 100


def _fixed_tokens(kind: str, key: str, value: str) -> int:
    """Tokens of everything in the prompt except the haystack."""
    return (n_bytes(_INSTRUCTIONS[kind]) + n_bytes(_NEEDLES[kind].format(key=key, value=value) + " ")
            + n_bytes(_SEPARATOR) + n_bytes(_QUESTIONS[kind].format(key=key)))


def min_length(kind: NIAHKind, num_queries: int = 1) -> int:
    """The shortest prompt length (in tokens) any sample of ``kind`` with ``num_queries`` needles can have: the
    fixed text at its longest and :data:`MIN_HAYSTACK_TOKENS` of haystack per needle."""
    if num_queries == 1:
        worst = _fixed_tokens(kind, "k" * _MAX_KEY_CHARS, "0" * _MAX_VALUE_CHARS[kind])
        return worst + MIN_HAYSTACK_TOKENS
    key, value = "k" * _MAX_KEY_CHARS, "0" * _MAX_VALUE_CHARS[kind]
    needle = n_bytes(_MULTI_NEEDLES[kind].format(key=key, value=value) + " ")
    worst = (n_bytes(_MULTI_INSTRUCTIONS[kind]) + num_queries * needle + n_bytes(_SEPARATOR)
             + n_bytes(_MULTI_QUESTIONS[kind].format(key=key)))
    return worst + num_queries * MIN_HAYSTACK_TOKENS


@dataclass(frozen=True)
class NIAHQuery:
    """One question of a (multi-query) NIAH prompt: ``question`` is answered by ``answer``, the value of ``needle``,
    which starts at token ``needle_start`` of the prompt; ``needle_depth`` is its offset / haystack length."""

    question: str
    answer: str
    needle: str
    needle_start: int
    needle_depth: float


@dataclass(frozen=True)
class NIAHSample:
    """One needle-in-a-haystack prompt.

    ``prompt`` ends with ``question``; ``input_ids`` ``[T] int64`` are its byte-tokenizer tokens (no BOS), with
    ``T == length``; ``needle`` occurs once in ``prompt``, starting at token ``needle_start``; ``answer`` is the exact
    string the model must continue with (score with :func:`mnemos.data.exact_match`). ``depth`` is the requested
    depth and ``needle_depth`` the realised one (needle offset / haystack length, after snapping to a sentence).

    ``queries``: every question in the order it is asked (one for S-NIAH, ``num_queries`` for the multi-query
    form); ``queries[0]`` is ``question`` / ``answer`` / ``needle``. ``context`` is the prompt before the first
    question (instruction and haystack with the needles, without the blank line).
    """

    kind: str
    prompt: str
    input_ids: Tensor
    question: str
    answer: str
    needle: str
    needle_start: int
    length: int
    depth: float
    needle_depth: float
    queries: tuple[NIAHQuery, ...] = ()
    context: str = ""

    def ask(self, k: int) -> NIAHSample:
        """Question ``k`` asked on its own right after the context: a one-query sample whose prompt is
        ``context + "\\n\\n" + queries[k].question`` (``ask(0)`` has this sample's prompt)."""
        q = self.queries[k]
        prompt = self.context + _SEPARATOR + q.question
        return NIAHSample(kind=self.kind, prompt=prompt, input_ids=ByteTokenizer().encode_tensor(prompt),
                          question=q.question, answer=q.answer, needle=q.needle, needle_start=q.needle_start,
                          length=n_bytes(prompt), depth=self.depth, needle_depth=q.needle_depth, queries=(q,),
                          context=self.context)

    def follow_up(self, k: int) -> str:
        """The text that asks question ``k >= 1`` after the answer to the previous one: ``"\\n\\n" + question``."""
        if not 1 <= k < len(self.queries):
            raise ValueError(f"k must be in [1, {len(self.queries)}) (question 0 ends the prompt), got {k!r}")
        return _SEPARATOR + self.queries[k].question


def _needle_head(kind: str) -> str:
    """The needle's words before its first blank: "One of the special magic numbers for ", "The pass key is "."""
    return _NEEDLES[kind].split("{")[0]


def _random_key(rng: np.random.Generator) -> str:
    return f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"


def _random_value(kind: str, rng: np.random.Generator) -> str:
    if kind == "passkey":
        return str(int(rng.integers(10 ** (_PASSKEY_DIGITS - 1), 10**_PASSKEY_DIGITS)))
    if kind == "number":
        return str(int(rng.integers(10 ** (_NUMBER_DIGITS - 1), 10**_NUMBER_DIGITS)))
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _check_queries(kind: str, num_queries, shortest: int) -> None:
    """``num_queries``: an int >= 1 whose needles, questions and minimal haystacks fit in ``shortest`` tokens."""
    check_int("num_queries", num_queries, 1)
    if num_queries > 1 and shortest < min_length(kind, num_queries):
        raise ValueError(f"num_queries={num_queries} does not fit at length {shortest} for kind={kind!r}: "
                         f"{num_queries} needles, a question and {MIN_HAYSTACK_TOKENS} haystack tokens per needle "
                         f"need a length >= {min_length(kind, num_queries)}")


def make_niah_sample(
    kind: NIAHKind, length: int, depth: float, rng: np.random.Generator, corpus: str | None = None,
    num_queries: int = 1,
) -> NIAHSample:
    """Draw one sample of ``kind`` whose prompt is exactly ``length`` tokens, needle near ``depth`` in [0, 1].

    ``corpus`` is the natural-text haystack source for "number" and "uuid" (default: the built-in corpus); it must
    be None for "passkey", whose haystack is :data:`PASSKEY_NOISE` repeated. The key, the value and the haystack
    are redrawn until the haystack holds neither the key, nor the value, nor the needle's opening words (say, a
    needle left in a user corpus), so the needle is the only place the answer can come from.

    ``num_queries`` Q >= 2: the multi-query form (module docstring): Q needles at depths ``(i + depth) / Q``, Q
    questions; ``length`` counts the prompt up to the first question. Q = 1 draws exactly the single-needle sample.
    """
    if kind not in _KIND_TAG:
        raise ValueError(f"kind must be one of {tuple(_KIND_TAG)}, got {kind!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length < min_length(kind):
        raise ValueError(f"length must be an int >= {min_length(kind)} for kind={kind!r}, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if kind == "passkey" and corpus is not None:
        raise ValueError("corpus must be None for kind='passkey' (its haystack is the fixed noise paragraph)")
    _check_queries(kind, num_queries, length)
    if num_queries > 1:
        return _make_multi_query(kind, length, depth, num_queries, rng, corpus)

    for _ in range(_MAX_DRAWS):
        key = "" if kind == "passkey" else _random_key(rng)
        value = _random_value(kind, rng)
        n_hay = length - _fixed_tokens(kind, key, value)
        if kind == "passkey":
            haystack = (PASSKEY_NOISE * math.ceil(n_hay / len(PASSKEY_NOISE)))[:n_hay]
        else:
            haystack = filler_text(n_hay, seed=int(rng.integers(2**63)), corpus=corpus)
        if not any(text in haystack for text in (value, key, _needle_head(kind)) if text):
            break
    else:
        raise RuntimeError(f"no haystack free of the needle's key, value and wording after {_MAX_DRAWS} draws; "
                           "does the corpus repeat a few lines, or hold earlier NIAH prompts?")

    instruction = _INSTRUCTIONS[kind]
    needle = _NEEDLES[kind].format(key=key, value=value)
    question = _QUESTIONS[kind].format(key=key)
    offset = int(snap(sentence_starts(haystack), np.array([round(depth * len(haystack))]))[0])
    context, (needle_at,) = insert_pieces(haystack, [offset], [needle + " "])
    prompt = instruction + context + _SEPARATOR + question
    input_ids = ByteTokenizer().encode_tensor(prompt)
    if input_ids.numel() != length:  # the budget arithmetic above is the whole point of this module
        raise RuntimeError(f"bug: built a prompt of {input_ids.numel()} tokens for length={length}")
    needle_start, needle_depth = n_bytes(instruction) + needle_at, offset / max(len(haystack), 1)
    return NIAHSample(
        kind=kind, prompt=prompt, input_ids=input_ids, question=question, answer=value, needle=needle,
        needle_start=needle_start, length=length, depth=float(depth), needle_depth=needle_depth,
        queries=(NIAHQuery(question, value, needle, needle_start, needle_depth),), context=instruction + context,
    )


def _make_multi_query(
    kind: str, length: int, depth: float, Q: int, rng: np.random.Generator, corpus: str | None
) -> NIAHSample:
    """The multi-query sample (``Q >= 2``; arguments checked by :func:`make_niah_sample`)."""
    instruction = _MULTI_INSTRUCTIONS[kind]
    for _ in range(_MAX_DRAWS):
        keys = [_random_key(rng) for _ in range(Q)]
        values = [_random_value(kind, rng) for _ in range(Q)]
        order = [int(i) for i in rng.permutation(Q)]  # question k asks for needle order[k] (needles in text order)
        needles = [_MULTI_NEEDLES[kind].format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        questions = [_MULTI_QUESTIONS[kind].format(key=keys[i]) for i in order]
        fixed = (n_bytes(instruction) + sum(n_bytes(n + " ") for n in needles) + n_bytes(_SEPARATOR)
                 + n_bytes(questions[0]))
        n_hay = length - fixed
        if kind == "passkey":
            haystack = (PASSKEY_NOISE * math.ceil(n_hay / len(PASSKEY_NOISE)))[:n_hay]
        else:
            haystack = filler_text(n_hay, seed=int(rng.integers(2**63)), corpus=corpus)
        distinct = len(set(values)) == Q and not any(a in b for a in keys for b in keys if a is not b)
        head = _MULTI_NEEDLES[kind].split("{")[0]
        if distinct and not any(text in haystack for text in (*values, *keys, head)):
            break
    else:
        raise RuntimeError(f"no haystack free of the needles' keys, values and wording (with distinct keys and "
                           f"values) after {_MAX_DRAWS} draws; does the corpus repeat a few lines?")

    targets = np.array([round((i + depth) / Q * len(haystack)) for i in range(Q)])
    offsets = [int(o) for o in snap(sentence_starts(haystack), targets)]
    context, starts = insert_pieces(haystack, offsets, [n + " " for n in needles])
    prompt = instruction + context + _SEPARATOR + questions[0]
    input_ids = ByteTokenizer().encode_tensor(prompt)
    if input_ids.numel() != length:
        raise RuntimeError(f"bug: built a prompt of {input_ids.numel()} tokens for length={length}")
    head_len = n_bytes(instruction)
    queries = tuple(NIAHQuery(question=questions[k], answer=values[i], needle=needles[i],
                              needle_start=head_len + starts[i], needle_depth=offsets[i] / max(len(haystack), 1))
                    for k, i in enumerate(order))
    first = queries[0]
    return NIAHSample(
        kind=kind, prompt=prompt, input_ids=input_ids, question=first.question, answer=first.answer,
        needle=first.needle, needle_start=first.needle_start, length=length, depth=float(depth),
        needle_depth=first.needle_depth, queries=queries, context=instruction + context,
    )


@dataclass(frozen=True)
class NIAHConfig:
    """A grid of S-NIAH prompts: every length (tokens) x every depth x ``samples_per_cell`` samples.

    ``corpus_paths``: text files / directories for the natural-text haystack of "number" and "uuid" (see
    :func:`~mnemos.data.load_text`); empty means the built-in corpus. It must be empty for "passkey".

    ``num_queries``: needles (and questions) per prompt; 1 (default) is S-NIAH, byte for byte as before the option;
    Q >= 2 the multi-query form (module docstring), its needles at depths ``(i + depth) / Q``. Every length must
    hold Q needles with :data:`MIN_HAYSTACK_TOKENS` of haystack each (a ValueError naming ``num_queries`` otherwise).

    >>> samples = NIAHConfig(kind="number", lengths=(512,), depths=(0.5,), samples_per_cell=2).build(seed=0)
    >>> [(s.length, s.input_ids.shape[0], s.answer in s.needle) for s in samples]
    [(512, 512, True), (512, 512, True)]
    """

    kind: NIAHKind = "passkey"
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples_per_cell: int = 4
    corpus_paths: tuple[str, ...] = ()
    num_queries: int = 1

    def __post_init__(self):
        if self.kind not in get_args(NIAHKind):
            raise ValueError(f"kind must be one of {get_args(NIAHKind)}, got {self.kind!r}")
        check_lengths("lengths", self.lengths, min_length(self.kind))
        if not isinstance(self.depths, tuple) or not self.depths:
            raise ValueError(f"depths must be a non-empty tuple of floats in [0, 1], got {self.depths!r}")
        for d in self.depths:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
                raise ValueError(f"depths must hold numbers in [0, 1], got {d!r}")
        if len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths has repeated values: {self.depths}")
        check_int("samples_per_cell", self.samples_per_cell, 1)
        if not isinstance(self.corpus_paths, tuple):
            raise ValueError(f"corpus_paths must be a tuple of paths, got {self.corpus_paths!r}")
        if self.kind == "passkey" and self.corpus_paths:
            raise ValueError("corpus_paths must be empty for kind='passkey' (its haystack is the noise paragraph)")
        _check_queries(self.kind, self.num_queries, min(self.lengths))

    def build(self, seed: int) -> list[NIAHSample]:
        """All samples, ordered by length, then depth, then index. Same seed -> identical samples.

        Each sample is seeded by ``(seed, kind, length, depth, index)`` (and ``num_queries`` when it is >= 2), so
        growing the grid keeps the old samples.
        """
        check_int("seed", seed, 0)
        corpus = load_text(self.corpus_paths) if self.corpus_paths else None
        samples = []
        for length in self.lengths:
            for depth in self.depths:
                for i in range(self.samples_per_cell):
                    keys = (length, round(depth * 1_000_000), i) + ((self.num_queries,) if self.num_queries > 1 else ())
                    rng = sample_rng(seed, _KIND_TAG[self.kind], *keys)
                    samples.append(make_niah_sample(self.kind, length, float(depth), rng, corpus, self.num_queries))
        return samples


def stack_input_ids(samples: Sequence[NIAHSample] | Sequence[BABILongSample]) -> Tensor:
    """Samples of one length (NIAH, passkey-capacity or BABILong) -> their token ids, ``[N, T] int64``."""
    if not samples:
        raise ValueError("samples is empty")
    lengths = {s.length for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples must share one length to be stacked, got lengths {sorted(lengths)}")
    return torch.stack([s.input_ids for s in samples])
