"""BABILong-style reasoning in a haystack (Kuratov et al. 2024): bAbI stories (Weston et al. 2015) scattered in long
natural text.

A small world simulator plays a story: people move between locations and pick up, carry and drop objects; each
event is one sentence ("Mary went to the kitchen.", "John picked up the football."). The question is answered from
the simulated world, so the answer is right by construction:

- ``"qa1"``, single supporting fact: "Where is Mary?" (people only move).
- ``"qa2"``, two supporting facts: "Where is the football?", for an object someone has carried to a new place.
- ``"qa3"``, three supporting facts: "Where was the football before the kitchen?", the place the object was in
  just before it was carried into its current place (asked only when it has been there once, so it is unambiguous).

Answers are single words (a location). The story's sentences keep their order and are inserted at sentence starts
of a natural-text haystack cut so that the prompt, question included, is exactly the requested number of
:class:`~mnemos.data.ByteTokenizer` tokens::

    instruction + haystack with the facts inserted (each as fact + " ") + "\\n\\n" + question
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
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

__all__ = ["BABILongConfig", "BABILongSample", "BABILongTask", "LOCATIONS", "OBJECTS", "PEOPLE", "simulate_story"]

BABILongTask = Literal["qa1", "qa2", "qa3"]
_TASK_TAG = {"qa1": 11, "qa2": 12, "qa3": 13}

# The entities and verbs of bAbI tasks 1-3.
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("bathroom", "hallway", "kitchen", "garden", "office", "bedroom")
OBJECTS = ("football", "apple", "milk")
_MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
_TAKE_VERBS = ("got", "grabbed", "picked up", "took")
_DROP_VERBS = ("dropped", "discarded", "put down", "left")
# Story lengths: bAbI's stories for these tasks run from a few to a few dozen sentences.
_DEFAULT_NUM_FACTS = {"qa1": 6, "qa2": 10, "qa3": 14}
# Action mix of qa2/qa3 stories: mostly moves, so carried objects travel.
_ACTION_WEIGHTS = {"move": 0.5, "take": 0.3, "drop": 0.2}

_INSTRUCTION = ("The text below hides short facts about where people and objects are. "
                "Answer the question at the end with a single word.\n\n")
_SEPARATOR = "\n\n"
_QUESTIONS = {
    "qa1": "Question: Where is {subject}?\nAnswer:",
    "qa2": "Question: Where is the {subject}?\nAnswer:",
    "qa3": "Question: Where was the {subject} before the {place}?\nAnswer:",
}
_PEOPLE_RE = re.compile(r"\b(?:" + "|".join(PEOPLE) + r")\b")
MIN_HAYSTACK_TOKENS = 32
_MAX_DRAWS = 1000


@dataclass
class _Arrival:
    """An object reaching a place, and the facts (indices into the story) that show it."""

    place: str
    support: tuple[int, ...]


@dataclass
class _World:
    """The state of a bAbI world after some events. Objects are where their holder is, or where last dropped."""

    person_at: dict[str, str] = field(default_factory=dict)  # only people who have moved
    last_move: dict[str, int] = field(default_factory=dict)  # person -> index of their latest move
    holder: dict[str, str] = field(default_factory=dict)  # object -> person carrying it
    taken_at: dict[str, int] = field(default_factory=dict)  # object -> index of the take by its holder
    object_at: dict[str, str] = field(default_factory=dict)  # objects seen so far
    object_support: dict[str, tuple[int, ...]] = field(default_factory=dict)  # facts showing object_at
    trail: dict[str, list[_Arrival]] = field(default_factory=dict)  # object -> its places, consecutive distinct

    def move(self, person: str, place: str, i: int) -> None:
        self.person_at[person], self.last_move[person] = place, i
        for obj, who in self.holder.items():
            if who == person:
                self.object_at[obj] = place
                self.object_support[obj] = (self.taken_at[obj], i)
                if self.trail[obj][-1].place != place:
                    self.trail[obj].append(_Arrival(place, (self.taken_at[obj], i)))

    def take(self, person: str, obj: str, i: int) -> None:
        place = self.person_at[person]
        self.holder[obj], self.taken_at[obj] = person, i
        self.object_at[obj] = place
        self.object_support[obj] = (self.last_move[person], i)
        if obj not in self.trail:
            self.trail[obj] = [_Arrival(place, (self.last_move[person], i))]

    def drop(self, person: str, obj: str, i: int) -> None:
        del self.holder[obj]
        self.object_support[obj] = (self.last_move[person], i)


def _fact(kind: str, rng: np.random.Generator, person: str, target: str) -> str:
    if kind == "move":
        return f"{person} {_MOVE_VERBS[rng.integers(len(_MOVE_VERBS))]} the {target}."
    verbs = _TAKE_VERBS if kind == "take" else _DROP_VERBS
    return f"{person} {verbs[rng.integers(len(verbs))]} the {target}."


def simulate_story(task: BABILongTask, num_facts: int, rng: np.random.Generator):
    """Play ``num_facts`` random events and pick a question of ``task`` that the story answers.

    Returns ``(facts, question, answer, supporting)`` (supporting: sorted indices into ``facts``), or None when
    this story admits no such question (the caller draws another).
    """
    world = _World()
    facts: list[str] = []
    for i in range(num_facts):
        options: dict[str, list[tuple[str, str]]] = {
            "move": [(p, loc) for p in PEOPLE for loc in LOCATIONS if world.person_at.get(p) != loc]
        }
        if task != "qa1":
            options["take"] = [
                (p, o) for p in world.person_at for o in OBJECTS
                if o not in world.holder and world.object_at.get(o, world.person_at[p]) == world.person_at[p]
            ]
            options["drop"] = [(p, o) for o, p in world.holder.items()]
        kinds = [k for k in options if options[k]]
        weights = np.array([_ACTION_WEIGHTS[k] for k in kinds])
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        person, target = options[kind][rng.integers(len(options[kind]))]
        facts.append(_fact(kind, rng, person, target))
        getattr(world, kind)(person, target, i)

    if task == "qa1":
        people = sorted(world.person_at)
        if not people:
            return None
        who = people[rng.integers(len(people))]
        return facts, _QUESTIONS["qa1"].format(subject=who), world.person_at[who], (world.last_move[who],)
    carried = sorted(o for o, trail in world.trail.items() if len(trail) >= 2)
    if task == "qa2":
        if not carried:
            return None
        obj = carried[rng.integers(len(carried))]
        support = tuple(sorted(set(world.object_support[obj])))
        return facts, _QUESTIONS["qa2"].format(subject=obj), world.object_at[obj], support
    # qa3: the place before the current one, if the current one was reached only once
    askable = [o for o in carried if all(a.place != world.trail[o][-1].place for a in world.trail[o][:-1])]
    if not askable:
        return None
    obj = askable[rng.integers(len(askable))]
    before, now = world.trail[obj][-2], world.trail[obj][-1]
    question = _QUESTIONS["qa3"].format(subject=obj, place=now.place)
    return facts, question, before.place, tuple(sorted(set(before.support + now.support)))


def _max_fact_tokens() -> int:
    verb = max(map(len, _MOVE_VERBS + _TAKE_VERBS + _DROP_VERBS))
    noun = max(map(len, LOCATIONS + OBJECTS))
    return max(map(len, PEOPLE)) + 1 + verb + len(" the ") + noun + len(".")


def _max_question_tokens() -> int:
    word = max(map(len, PEOPLE + LOCATIONS + OBJECTS))
    return max(n_bytes(q.format(subject="x" * word, place="x" * word)) for q in _QUESTIONS.values())


def min_length(num_facts: int) -> int:
    """The shortest prompt length (in tokens) any story of ``num_facts`` facts fits in."""
    return (n_bytes(_INSTRUCTION) + num_facts * (_max_fact_tokens() + 1) + n_bytes(_SEPARATOR)
            + _max_question_tokens() + MIN_HAYSTACK_TOKENS)


@dataclass(frozen=True)
class BABILongSample:
    """One BABILong prompt.

    ``prompt`` ends with ``question``; ``input_ids`` ``[T] int64`` (``T == length``) are its byte-tokenizer tokens;
    ``facts`` are the story's sentences in order, ``fact_starts`` the token index where each starts in the prompt;
    ``supporting_facts`` index the facts the answer follows from; ``answer`` is one word.
    """

    task: str
    prompt: str
    input_ids: Tensor
    question: str
    answer: str
    facts: tuple[str, ...]
    fact_starts: tuple[int, ...]
    supporting_facts: tuple[int, ...]
    length: int


@dataclass(frozen=True)
class BABILongConfig:
    """``samples_per_length`` prompts of task ``task`` for each context length in ``lengths`` (tokens).

    ``num_facts``: sentences per story; None takes bAbI-like defaults (6 for qa1, 10 for qa2, 14 for qa3).
    ``corpus_paths``: text files / directories for the haystack (:func:`~mnemos.data.load_text`); empty means the
    built-in corpus. Haystack spans that name one of :data:`PEOPLE` are redrawn, so every sentence about a person
    in the prompt is a fact of the story.

    >>> s = BABILongConfig(task="qa1", lengths=(1024,), samples_per_length=1).build(seed=0)[0]
    >>> len(s.input_ids), s.prompt.endswith(s.question), s.answer
    (1024, True, 'hallway')
    >>> s.facts[-2:], s.supporting_facts
    (('John went back to the bedroom.', 'John went back to the hallway.'), (5,))
    """

    task: BABILongTask = "qa1"
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    samples_per_length: int = 8
    num_facts: int | None = None
    corpus_paths: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in get_args(BABILongTask):
            raise ValueError(f"task must be one of {get_args(BABILongTask)}, got {self.task!r}")
        if self.num_facts is not None:
            # the shortest story with a question: one move (qa1); a move, a take and a carrying move (qa2, qa3)
            check_int("num_facts", self.num_facts, 1 if self.task == "qa1" else 3)
        check_lengths("lengths", self.lengths, min_length(self.resolved_num_facts))
        check_int("samples_per_length", self.samples_per_length, 1)
        if not isinstance(self.corpus_paths, tuple):
            raise ValueError(f"corpus_paths must be a tuple of paths, got {self.corpus_paths!r}")

    @property
    def resolved_num_facts(self) -> int:
        return _DEFAULT_NUM_FACTS[self.task] if self.num_facts is None else self.num_facts

    def build(self, seed: int) -> list[BABILongSample]:
        """All samples, ordered by length, then index; each seeded by ``(seed, task, length, index)``."""
        check_int("seed", seed, 0)
        corpus = load_text(self.corpus_paths) if self.corpus_paths else None
        return [
            _make_sample(self.task, length, self.resolved_num_facts, sample_rng(seed, _TASK_TAG[self.task], length, i),
                         corpus)
            for length in self.lengths
            for i in range(self.samples_per_length)
        ]


def _make_sample(task: str, length: int, num_facts: int, rng: np.random.Generator, corpus: str | None):
    for _ in range(_MAX_DRAWS):
        story = simulate_story(task, num_facts, rng)
        if story is not None:
            break
    else:
        raise RuntimeError(f"no {task} story of {num_facts} facts had a question after {_MAX_DRAWS} draws")
    facts, question, answer, supporting = story

    pieces = [f + " " for f in facts]
    n_hay = length - n_bytes(_INSTRUCTION) - sum(map(n_bytes, pieces)) - n_bytes(_SEPARATOR) - n_bytes(question)
    for _ in range(_MAX_DRAWS):
        haystack = filler_text(n_hay, seed=int(rng.integers(2**63)), corpus=corpus)
        if not _PEOPLE_RE.search(haystack):
            break
    else:
        raise RuntimeError(f"every haystack span drawn names one of {PEOPLE}; use a corpus that rarely does")

    targets = np.sort(rng.integers(0, len(haystack) + 1, size=len(facts)))
    offsets = snap(sentence_starts(haystack), targets)
    context, starts = insert_pieces(haystack, offsets.tolist(), pieces)
    prompt = _INSTRUCTION + context + _SEPARATOR + question
    input_ids = ByteTokenizer().encode_tensor(prompt)
    if input_ids.numel() != length:
        raise RuntimeError(f"bug: built a prompt of {input_ids.numel()} tokens for length={length}")
    head = n_bytes(_INSTRUCTION)
    return BABILongSample(
        task=task, prompt=prompt, input_ids=input_ids, question=question, answer=answer, facts=tuple(facts),
        fact_starts=tuple(head + s for s in starts), supporting_facts=supporting, length=length,
    )
