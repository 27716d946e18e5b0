import re

import pytest
import torch

from mnemos.data import NIAHConfig, builtin_corpus, exact_match, exact_match_accuracy, stack_input_ids

# Independent readers of the generated text: they know the prompt formats, not the generator's variables.
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_KEY = r"[a-z]+-[a-z]+"
_NEEDLE_RE = {
    "passkey": re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\."),
    "number": re.compile(rf"One of the special magic numbers for ({_KEY}) is: (\d{{7}})\."),
    "uuid": re.compile(rf"One of the special magic uuids for ({_KEY}) is: ({_UUID})\."),
}
_QUESTION_RE = {
    "passkey": re.compile(r"\n\nWhat is the pass key\? The pass key is\Z"),
    "number": re.compile(rf"\n\nWhat is the special magic number for ({_KEY}) mentioned in the provided text\? "
                         rf"The special magic number for \1 mentioned in the provided text is\Z"),
    "uuid": re.compile(rf"\n\nWhat is the special magic uuid for ({_KEY}) mentioned in the provided text\? "
                       rf"The special magic uuid for \1 mentioned in the provided text is\Z"),
}
_VALUE_RE = {"passkey": re.compile(r"\d+"), "number": re.compile(r"\d{7}"), "uuid": re.compile(_UUID)}


def _read_answer(kind, input_ids):
    """Recover the answer from the token ids alone, checking that the needle is there exactly once."""
    text = bytes(input_ids.tolist()).decode("utf-8")
    needles = _NEEDLE_RE[kind].findall(text)
    assert len(needles) == 1, f"needle found {len(needles)} times"
    question = _QUESTION_RE[kind].search(text)
    assert question is not None, "prompt does not end with the question"
    if kind == "passkey":
        first, second = needles[0]
        assert first == second
        value = first
    else:
        key, value = needles[0]
        assert question.group(1) == key
        assert text.count(key) == 3  # the needle and the question's two mentions
    assert text.count(value) == (2 if kind == "passkey" else 1)  # nowhere else in the haystack
    assert _VALUE_RE[kind].fullmatch(value)
    return value


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
def test_answer_is_recoverable_and_lengths_are_exact(kind):
    lengths, depths = (512, 777, 3000), (0.0, 0.3, 1.0)
    samples = NIAHConfig(kind=kind, lengths=lengths, depths=depths, samples_per_cell=2).build(seed=0)
    assert len(samples) == 3 * 3 * 2
    assert [s.length for s in samples] == [n for n in lengths for _ in range(6)]
    for s in samples:
        assert s.input_ids.dtype == torch.int64 and s.input_ids.shape == (s.length,)
        assert len(s.prompt.encode("utf-8")) == s.length
        assert s.prompt.endswith(s.question)
        assert _read_answer(kind, s.input_ids) == s.answer
        assert bytes(s.input_ids[s.needle_start : s.needle_start + len(s.needle)].tolist()).decode() == s.needle
        assert exact_match(" " + s.answer + ".", s.answer)


def test_needle_sits_at_the_requested_depth():
    depths = tuple(i / 10 for i in range(11))
    samples = NIAHConfig(kind="passkey", lengths=(4096,), depths=depths, samples_per_cell=1).build(seed=1)
    starts = [s.needle_start for s in samples]
    assert starts == sorted(starts)
    for s in samples:  # noise sentences are at most 22 characters, so snapping moves the needle very little
        assert abs(s.needle_depth - s.depth) < 25 / 3800
    natural = NIAHConfig(kind="number", lengths=(8192,), depths=(0.1, 0.5, 0.9), samples_per_cell=3).build(seed=1)
    for s in natural:
        assert abs(s.needle_depth - s.depth) < 0.1


def test_seed_determinism_and_grid_stability():
    cfg = NIAHConfig(kind="uuid", lengths=(600,), depths=(0.5,), samples_per_cell=3)
    a, b, c = cfg.build(seed=5), cfg.build(seed=5), cfg.build(seed=6)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert torch.equal(stack_input_ids(a), stack_input_ids(b))
    assert all(x.prompt != y.prompt for x, y in zip(a, c, strict=True))
    grown = NIAHConfig(kind="uuid", lengths=(600, 700), depths=(0.25, 0.5), samples_per_cell=3).build(seed=5)
    assert [s.prompt for s in grown if s.length == 600 and s.depth == 0.5] == [s.prompt for s in a]


def test_user_corpus_haystack(tmp_path):
    (tmp_path / "doc.md").write_text("Ein Satz über Bäume. " * 50 + "Noch einer hier! " * 30, encoding="utf-8")
    samples = NIAHConfig(kind="number", lengths=(900,), depths=(0.5,), samples_per_cell=2,
                         corpus_paths=(str(tmp_path),)).build(seed=0)
    for s in samples:
        assert len(s.prompt.encode("utf-8")) == 900
        assert "Bäume" in s.prompt
        assert _read_answer("number", s.input_ids) == s.answer


def test_needles_left_in_a_user_corpus_are_never_in_the_haystack(tmp_path):
    plain = builtin_corpus()[:6000]  # varied word lengths: spans of every length exist
    decoys = "".join(f"One of the special magic numbers for amber-otter is: {1000000 + i}. " for i in range(30))
    (tmp_path / "c.txt").write_text(plain + decoys + plain, encoding="utf-8")
    samples = NIAHConfig(kind="number", lengths=(700,), depths=(0.5,), samples_per_cell=20,
                         corpus_paths=(str(tmp_path),)).build(seed=0)
    for s in samples:
        assert _read_answer("number", s.input_ids) == s.answer


def test_stack_input_ids():
    samples = NIAHConfig(lengths=(512, 600), depths=(0.5,), samples_per_cell=2).build(seed=0)
    assert stack_input_ids(samples[:2]).shape == (2, 512)
    with pytest.raises(ValueError, match="one length"):
        stack_input_ids(samples)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(kind="multikey"), "kind"),
        (dict(lengths=(100,)), "lengths"),
        (dict(lengths=()), "lengths"),
        (dict(lengths=[1024]), "lengths"),
        (dict(lengths=(1024, 1024)), "lengths"),
        (dict(depths=(1.5,)), "depths"),
        (dict(depths=(-0.1,)), "depths"),
        (dict(samples_per_cell=0), "samples_per_cell"),
        (dict(kind="passkey", corpus_paths=("x",)), "corpus_paths"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NIAHConfig(**kwargs)


def test_missing_corpus_path_is_an_error():
    cfg = NIAHConfig(kind="number", lengths=(1024,), corpus_paths=("/no/such/dir",))
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        cfg.build(seed=0)


def test_exact_match_scoring():
    assert exact_match("71432", "71432")
    assert exact_match("  71432.\nThe pass key", "71432")
    assert not exact_match("714321", "71432")
    assert not exact_match("", "71432")
    assert not exact_match("Kitchen", "kitchen")
    assert exact_match(" kitchen\n", "kitchen")
    # an answer closed by a period ends there, whatever follows it without a space (a model trained on " answer.")
    assert exact_match(" 71432.0", "71432") and exact_match(" 71432..", "71432") and exact_match("kitchen.The", "kitchen")
    assert not exact_match(" 71432-0", "71432") and not exact_match(" 7143.2", "71432")
    assert not exact_match(" 71432", "7143") and not exact_match(" 71432.", "7143")
    assert exact_match_accuracy(["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    with pytest.raises(ValueError, match="answer"):
        exact_match("a b", "a b")
    with pytest.raises(ValueError, match="predictions"):
        exact_match_accuracy(["a"], ["a", "b"])
