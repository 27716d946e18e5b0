import re

import pytest
import torch

from mnemos.data import BABILongConfig, builtin_corpus, exact_match, stack_input_ids

# An independent reader: it knows bAbI's sentence forms and replays them, without the generator's simulator.
_NAMES = "Mary|John|Daniel|Sandra"
_FACT_RE = re.compile(
    rf"\b(?P<who>{_NAMES}) (?:"
    r"(?:moved|went|journeyed|travelled|went back) to the (?P<place>\w+)"
    r"|(?:got|grabbed|picked up|took) the (?P<taken>\w+)"
    r"|(?:dropped|discarded|put down|left) the (?P<dropped>\w+)"
    r")\."
)
_QUESTION_RE = re.compile(
    r"\n\nQuestion: (?:Where is (?:the (?P<obj>\w+)|(?P<who>[A-Z]\w+))"
    r"|Where was the (?P<obj3>\w+) before the (?P<place>\w+))\?\nAnswer:\Z"
)


def _replay(text):
    """Parse the facts and the question from the prompt text and answer it by replaying the story."""
    context, _, _ = text.rpartition("\n\nQuestion:")
    person_at, holder, object_at, trail = {}, {}, {}, {}
    facts = []
    for m in _FACT_RE.finditer(context):
        facts.append(m.group(0))
        who = m.group("who")
        if m.group("place"):
            person_at[who] = m.group("place")
            for obj, h in holder.items():
                if h == who:
                    object_at[obj] = person_at[who]
                    if trail[obj][-1] != person_at[who]:
                        trail[obj].append(person_at[who])
        elif m.group("taken"):
            obj = m.group("taken")
            assert object_at.get(obj, person_at[who]) == person_at[who], "took an object from another place"
            holder[obj], object_at[obj] = who, person_at[who]
            trail.setdefault(obj, [person_at[who]])
        else:
            obj = m.group("dropped")
            assert holder.pop(obj) == who, "dropped an object it did not hold"
    q = _QUESTION_RE.search(text)
    assert q is not None, "prompt does not end with a question"
    if q.group("who"):
        return facts, person_at[q.group("who")]
    if q.group("obj"):
        assert len(trail[q.group("obj")]) >= 2, "qa2 object was never carried"
        return facts, object_at[q.group("obj")]
    places = trail[q.group("obj3")]
    assert places[-1] == q.group("place") and places.count(q.group("place")) == 1
    return facts, places[-2]


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3"])
def test_answer_follows_from_the_text(task):
    lengths = (700, 1024, 2500)
    samples = BABILongConfig(task=task, lengths=lengths, samples_per_length=12).build(seed=0)
    assert [s.length for s in samples] == [n for n in lengths for _ in range(12)]
    answers = set()
    for s in samples:
        assert s.input_ids.dtype == torch.int64 and s.input_ids.shape == (s.length,)
        assert len(s.prompt.encode("utf-8")) == s.length
        assert s.prompt.endswith(s.question)
        text = bytes(s.input_ids.tolist()).decode("utf-8")
        facts, answer = _replay(text)
        assert answer == s.answer and len(answer.split()) == 1
        assert tuple(facts) == s.facts  # every sentence about a person in the prompt is a story fact
        for fact, start in zip(s.facts, s.fact_starts, strict=True):
            assert text.encode()[start : start + len(fact)].decode() == fact
        assert list(s.fact_starts) == sorted(s.fact_starts)
        assert exact_match(" " + s.answer, s.answer)
        answers.add(answer)
    assert len(answers) > 1
    assert stack_input_ids(samples[:12]).shape == (12, lengths[0])


def test_supporting_facts_name_the_subject_and_the_answer():
    sizes = {"qa1": {1}, "qa2": {2}, "qa3": {2, 3}}  # qa3: the take can support both places
    for task in sizes:
        for s in BABILongConfig(task=task, lengths=(1024,), samples_per_length=10).build(seed=2):
            assert len(s.supporting_facts) in sizes[task]
            support = [s.facts[i] for i in s.supporting_facts]
            subject = re.search(r"Where (?:is|was) (?:the )?(\w+)", s.question).group(1)
            assert any(re.search(rf"\b{subject}\b", f) for f in support)
            assert any(f.endswith(f" the {s.answer}.") for f in support)


def test_haystack_never_names_a_person(tmp_path):
    plain = builtin_corpus()[:6000]  # varied word lengths: spans of every length exist
    decoys = "John went to the office. Mary dropped the milk. " * 30
    (tmp_path / "c.txt").write_text(plain + decoys + plain, encoding="utf-8")
    cfg = BABILongConfig(task="qa2", lengths=(900,), samples_per_length=20, corpus_paths=(str(tmp_path),))
    for s in cfg.build(seed=0):
        facts, answer = _replay(s.prompt)
        assert tuple(facts) == s.facts and answer == s.answer


def test_shortest_stories():
    for task, n in [("qa1", 1), ("qa2", 3), ("qa3", 3)]:
        for s in BABILongConfig(task=task, lengths=(600,), samples_per_length=3, num_facts=n).build(seed=0):
            assert len(s.facts) == n
            assert _replay(s.prompt)[1] == s.answer


def test_seed_determinism():
    cfg = BABILongConfig(task="qa2", lengths=(800,), samples_per_length=4)
    a, b, c = cfg.build(seed=1), cfg.build(seed=1), cfg.build(seed=2)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(task="qa4"), "task"),
        (dict(lengths=(300,)), "lengths"),
        (dict(lengths=(2048,), num_facts=0), "num_facts"),
        (dict(task="qa3", lengths=(2048,), num_facts=2), "num_facts"),
        (dict(task="qa1", num_facts=40, lengths=(1024,)), "lengths"),
        (dict(samples_per_length=0), "samples_per_length"),
        (dict(corpus_paths=["a"]), "corpus_paths"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BABILongConfig(**kwargs)
