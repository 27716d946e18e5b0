"""NIAH multi-query (``NIAHConfig(num_queries=Q)``) and its shared-context mode (``mnemos eval niah --turns``;
docs/BENCHMARKS.md, S-NIAH and "Shared context, many queries").

- the multi-query prompt holds every needle once, at its stratified depth, and each question's answer is its needle's
  value (read back from the text by an independent reader); with ``num_queries=1`` the prompts are byte for byte
  those of the single-needle generator (hashes taken before the option existed);
- with a state that loses nothing, each turn's answer in the shared mode equals greedy decoding from a fresh prefill
  of the prompt the shared mode built up to that turn (the earlier questions and the model's own answers in it), for
  a transformer and a Gated DeltaNet: every call's logits equal a fresh prefill of everything fed so far;
- with an evicting KV policy the shared mode runs, reports accuracy by turn and the (bounded) state bytes, and its
  answers equal a hand replay that carries the compressed cache;
- bad arguments are ValueErrors naming the argument.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from mnemos.cli import main
from mnemos.data import NIAHConfig
from mnemos.data.niah import make_niah_sample, min_length
from mnemos.eval import EvalOptions, MnemosLMAdapter, StatefulLM, evaluate
from mnemos.eval.harness import with_kv_policies
from mnemos.eval.report import write_report
from mnemos.kv import StreamingLLM
from mnemos.models import MnemosConfig, MnemosLM

F64 = torch.float64
_KEY = r"[a-z]+-[a-z]+"
_MULTI_NEEDLE = {
    "passkey": re.compile(rf"The pass key for ({_KEY}) is (\d{{5}})\. Remember it\. \2 is the pass key for \1\. "),
    "number": re.compile(rf"One of the special magic numbers for ({_KEY}) is: (\d{{7}})\. "),
    "uuid": re.compile(rf"One of the special magic uuids for ({_KEY}) is: ([0-9a-f-]{{36}})\. "),
}
_QUESTION_KEY = {
    "passkey": re.compile(rf"\AWhat is the pass key for ({_KEY})\? The pass key for \1 is\Z"),
    "number": re.compile(rf"\AWhat is the special magic number for ({_KEY}) mentioned in the provided text\? "
                         rf"The special magic number for \1 mentioned in the provided text is\Z"),
    "uuid": re.compile(rf"\AWhat is the special magic uuid for ({_KEY}) mentioned in the provided text\? "
                       rf"The special magic uuid for \1 mentioned in the provided text is\Z"),
}
# NIAHConfig(kind, lengths=(520, 777), depths=(0, 0.4, 1), samples_per_cell=2, corpus_paths=<_corpus_text() for
# number / uuid>).build(seed=3), hashed with the generator before num_queries existed (commit 2fb6cfd): the prompt,
# answer, needle_start, needle_depth and token ids of every sample
_SINGLE_NEEDLE_SHA256 = {
    "passkey": "8eb42b849e951a9f231678674443e74c8dde375837ee210cd1a74b8e9215f235",
    "number": "845179c77913617d0d867e9e2b070eccee56da82023606faaa59731927163c73",
    "uuid": "0253a60d3171bca5fbb63e2e06291a2ae2426946fc8681c8e07f3d0638c14e2a",
}


def _opts(**kw) -> EvalOptions:
    return EvalOptions(progress=False, raise_errors=True, **kw)


def _model(variant: str, seed: int = 2) -> MnemosLM:
    torch.manual_seed(seed)
    cfg = MnemosConfig(variant=variant, vocab_size=259, d_model=32, n_layers=2, n_heads=4)
    return MnemosLM(cfg).to(F64).eval()


class _Recorder(StatefulLM):
    """A mnemos model that records the ids of every call, sequence by sequence (a new one at each init_state), and
    the logits at each call's last position."""

    def __init__(self, model: MnemosLM, name: str):
        self.base = MnemosLMAdapter(model, name=name)
        self.name, self.vocab_size, self.device = name, self.base.vocab_size, self.base.device
        self.max_context, self.state_growth, self.tokenizer = None, "growing", None
        self.sequences: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def init_state(self, batch: int):
        self.sequences.append([])
        return self.base.init_state(batch)

    def forward(self, ids, state):
        logits, state = self.base.forward(ids, state)
        self.sequences[-1].append((ids[0].clone(), logits[0, -1].clone()))
        return logits, state


# -- data ---------------------------------------------------------------------------------------------------------------


def _read_needles(kind: str, sample) -> list[tuple[str, str, int]]:
    """(key, value, character offset in the haystack) of every needle, read from the prompt text alone."""
    body = sample.prompt[: sample.prompt.rindex("\n\n")]
    body = body[body.index("\n\n") + 2 :]  # the haystack with the needles, after the instruction
    found, removed = [], 0
    for mt in _MULTI_NEEDLE[kind].finditer(body):
        found.append((mt.group(1), mt.group(2), mt.start() - removed))
        removed += mt.end() - mt.start()
    return found


def _corpus_text() -> str:
    """A small haystack corpus: 400 short sentences (no digits), the same on every machine."""
    words = "the a river stone walked under over quietly green house old bright and of to in slowly".split()
    sentences = [" ".join(words[(7 * i * j + 3 * j + i) % len(words)] for j in range(4 + i % 5)) for i in range(400)]
    return " ".join(x.capitalize() + "." for x in sentences) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, ...]:
    """:func:`_corpus_text` in a file (the built-in corpus takes seconds to load)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(_corpus_text())
    return (str(path),)


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
def test_multi_query_prompt_holds_every_needle_once_at_its_depth(kind, corpus):
    Q, depth, length = 4, 0.4, 1500
    samples = NIAHConfig(kind=kind, lengths=(length,), depths=(depth,), samples_per_cell=3, num_queries=Q,
                         corpus_paths=() if kind == "passkey" else corpus).build(seed=11)
    for s in samples:
        assert s.input_ids.numel() == length and bytes(s.input_ids.tolist()).decode() == s.prompt
        needles = _read_needles(kind, s)
        assert len(needles) == Q, "each needle once"
        keys, values = [k for k, _, _ in needles], [v for _, v, _ in needles]
        assert len(set(keys)) == Q and len(set(values)) == Q
        for key, value, _ in needles:
            assert s.prompt.count(value) == (2 if kind == "passkey" else 1)  # the needle only (passkey says it twice)
            assert not any(key in other for other in keys if other != key)
        # depths: needle i (text order) at the sentence start nearest to (i + depth) / Q of the haystack
        hay_len = len(s.context) - s.context.index("\n\n") - 2 - sum(len(q.needle) + 1 for q in s.queries)
        gap = 30 if kind == "passkey" else 60  # the longest sentence of the noise paragraph / of the corpus
        for i, (_, _, offset) in enumerate(needles):
            assert abs(offset - (i + depth) / Q * hay_len) <= gap, (i, offset, hay_len)
        # questions: one per needle, in some order, each answered by its needle's value; the prompt ends with the first
        asked = [_QUESTION_KEY[kind].match(q.question).group(1) for q in s.queries]
        assert sorted(asked) == sorted(keys)
        by_key = {k: v for k, v, _ in needles}
        assert [q.answer for q in s.queries] == [by_key[k] for k in asked]
        assert s.prompt.endswith("\n\n" + s.queries[0].question) and s.question == s.queries[0].question
        for q in s.queries:
            start = q.needle_start
            assert bytes(s.input_ids[start : start + len(q.needle)].tolist()).decode() == q.needle
        assert [s.follow_up(k) for k in range(1, Q)] == ["\n\n" + q.question for q in s.queries[1:]]
        # asked on its own: the context, a blank line, the question
        one = s.ask(2)
        assert one.prompt == s.context + "\n\n" + s.queries[2].question and one.answer == s.queries[2].answer
        assert s.ask(0).prompt == s.prompt
    # the question order is drawn: not always the needles' text order
    orders = {tuple(q.needle_start for q in s.queries) for s in samples}
    assert any(list(o) != sorted(o) for o in orders)


def test_a_constructed_multi_query_sample():
    """A hand-checked 2-needle passkey prompt: the exact text around the needles and the question."""
    s = make_niah_sample("passkey", 700, 0.0, np.random.default_rng(5), num_queries=2)
    (k0, v0, _), (k1, v1, _) = _read_needles("passkey", s)
    assert s.prompt.startswith("Some pass keys are hidden inside a lot of irrelevant text. Find them and memorize "
                               "them. I will quiz you about them afterwards.\n\n"
                               f"The pass key for {k0} is {v0}. Remember it. {v0} is the pass key for {k0}. The grass")
    first, second = s.queries
    assert {first.answer, second.answer} == {v0, v1}
    key = k0 if first.answer == v0 else k1
    assert first.question == f"What is the pass key for {key}? The pass key for {key} is"
    assert first.needle_depth == 0.0 and abs(second.needle_depth - 0.5) < 0.05 or \
        second.needle_depth == 0.0 and abs(first.needle_depth - 0.5) < 0.05


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
def test_one_query_prompts_are_unchanged(kind, corpus):
    cfg = NIAHConfig(kind=kind, lengths=(520, 777), depths=(0.0, 0.4, 1.0), samples_per_cell=2,
                     corpus_paths=() if kind == "passkey" else corpus)
    assert cfg.num_queries == 1
    h = hashlib.sha256()
    for x in cfg.build(seed=3):
        h.update(x.prompt.encode())
        h.update(x.answer.encode())
        h.update(str(x.needle_start).encode())
        h.update(repr(x.needle_depth).encode())
        h.update(bytes(x.input_ids.tolist()))
        assert len(x.queries) == 1 and x.queries[0].answer == x.answer and x.ask(0).prompt == x.prompt
    assert h.hexdigest() == _SINGLE_NEEDLE_SHA256[kind]


# -- shared context ----------------------------------------------------------------------------------------------------


def _greedy_after_a_fresh_prefill(model: MnemosLM, ids: torch.Tensor, n_new: int) -> list[int]:
    """Greedy tokens after a fresh one-call prefill of ``ids`` (the cache carried while decoding)."""
    out = []
    with torch.no_grad():
        logits, cache = model(ids[None], model.init_cache(1))
        for _ in range(n_new):
            out.append(int(logits[0, -1].argmax()))
            logits, cache = model(torch.tensor([out[-1:]]), cache)
    return out


@pytest.mark.parametrize("variant", ["transformer", "gated_deltanet"])
def test_shared_turns_equal_a_fresh_prefill_of_the_same_prompt(variant):
    model = _model(variant)
    rec = _Recorder(model, variant)
    cfg = NIAHConfig(kind="passkey", lengths=(700,), depths=(0.5,), samples_per_cell=2, num_queries=3)
    plain, shared = evaluate(rec, cfg, options=_opts(niah_turns=("shared",), stream_chunk=200)).cells
    (_, fresh) = evaluate(MnemosLMAdapter(model, name=variant), cfg, options=_opts(niah_turns=("fresh",))).cells
    assert shared.params == {"kind": "passkey", "length": 700, "depth": 0.5, "queries": 3, "mode": "shared"}
    assert shared.metrics["turn_n"] == [2, 2, 2] and len(shared.metrics["turn_correct"]) == 3
    n_new = len(" 12345") + 2
    answers_seen = set()
    # the shared cell's two sequences, one per sample, are the last the model saw
    for s, rec_s, seq in zip(cfg.build(0), shared.samples, rec.sequences[-2:], strict=True):
        prompt = s.input_ids
        for k in range(3):
            gen = rec_s["generated_ids"][k]
            assert gen == _greedy_after_a_fresh_prefill(model, prompt, n_new), f"turn {k + 1}: not a fresh prefill's"
            answers_seen.add(tuple(gen))
            if k < 2:  # the prompt of the next turn: this one, the model's answer, a blank line, the next question
                prompt = torch.cat([prompt, torch.tensor(gen), torch.tensor(list(s.follow_up(k + 1).encode()))])
        # the shared mode fed exactly that dialogue (the last answer's last token aside); the logits that answer each
        # question (the last call before each answer's first token) and the last call's equal a fresh one-call
        # prefill of everything fed up to them
        fed = torch.cat([ids for ids, _ in seq])
        assert torch.equal(fed, torch.cat([prompt, torch.tensor(rec_s["generated_ids"][2][:-1])]))
        ends = torch.tensor([ids.numel() for ids, _ in seq]).cumsum(0).tolist()
        checked = [i for i, (ids, _) in enumerate(seq) if ids.numel() > 1][-3:] + [len(seq) - 1]
        assert len(checked) == 4 and len(seq) == -(-700 // 200) + 3 * (n_new - 1) + 2
        with torch.no_grad():
            for i in checked:
                ref, _ = model(fed[None, : ends[i]], model.init_cache(1))
                torch.testing.assert_close(seq[i][1], ref[0, -1], rtol=1e-9, atol=1e-9)
    assert len(answers_seen) > 1, "the model answers the same whatever it reads: the test could not fail"
    # a state that loses nothing: fresh gives the same answers; turn 1 is the plain cell's first question
    assert [r["generated_ids"] for r in fresh.samples] == [r["generated_ids"] for r in shared.samples]
    assert shared.metrics["turn_correct"] == fresh.metrics["turn_correct"]
    assert [r["prediction"] for r in plain.samples][0::3] == [r["predictions"][0] for r in shared.samples]
    # calls: shared streams the prompt in 4 and asks 2 more questions, fresh prefills 3 times in one call each
    assert plain.metrics["n"] == 6 and shared.metrics["calls"] == 2 * (4 + 2 + 3 * (n_new - 1))
    assert fresh.metrics["calls"] == 2 * (3 + 3 * (n_new - 1))


def test_shared_turns_with_an_evicting_policy(tmp_path):
    model = _model("transformer")
    base = MnemosLMAdapter(model, name="tpp")
    models = with_kv_policies([base], ["none", "streamingllm:budget=24,sinks=4"])
    cfg = NIAHConfig(kind="passkey", lengths=(600,), depths=(0.0,), samples_per_cell=2, num_queries=2)
    res = evaluate(models, cfg, options=_opts(niah_turns=("shared", "fresh"), stream_chunk=128))
    cells = {(c.model_name, c.params.get("mode")): c for c in res.cells}
    policy = "tpp + streamingllm:budget=24,sinks=4"
    assert len(cells) == 6
    for mode in ("shared", "fresh"):
        full, small = cells[("tpp", mode)].metrics, cells[(policy, mode)].metrics
        assert small["turn_n"] == [2, 2] and len(small["turn_correct"]) == 2 and 0.0 <= small["accuracy"] <= 1.0
        # 2 layers x 4 heads x 24 tokens x (K and V of 8 float64 + an int32 position): bounded and well below the full
        assert 0 < small["kv_cache_bytes"] <= 2 * 4 * 24 * (2 * 8 * 8 + 8) < full["kv_cache_bytes"]
        assert small["state_bytes"] >= small["kv_cache_bytes"]
    # the shared answers are a hand replay that carries a 24-entry StreamingLLM cache through the same calls
    shared = cells[(policy, "shared")]
    n_new = len(" 12345") + 2
    for s, rec in zip(cfg.build(0)[:2], shared.samples, strict=True):
        with StreamingLLM(24, sinks=4)(model):
            cache = model.init_cache(1)
        gens: list[list[int]] = []
        with torch.no_grad():
            ids = s.input_ids
            logits = None
            for start in range(0, ids.numel(), 128):  # the streamed prefill
                logits, cache = model(ids[None, start : start + 128], cache)
            for k in range(2):
                if k:
                    x = [gens[-1][-1]] + list(s.follow_up(k).encode())
                    logits, cache = model(torch.tensor([x]), cache)
                gen = []
                for i in range(n_new):
                    gen.append(int(logits[0, -1].argmax()))
                    if i + 1 < n_new:
                        logits, cache = model(torch.tensor([[gen[-1]]]), cache)
                gens.append(gen)
        assert rec["generated_ids"] == gens
    # the report: the accuracy-by-turn table and figure, the bytes table
    written = {p.name for p in write_report(res, tmp_path)}
    assert {"niah_turns.png", "niah_heatmap.png", "report.md"} <= written
    md = (tmp_path / "report.md").read_text()
    assert "## NIAH multi-query (passkey, 2 needles)" in md and "### NIAH: shared context, many queries" in md
    assert "passkey, 2 needles, length 600, accuracy by turn:" in md and "## Accuracy against state bytes" in md


def test_cli_queries_and_turns_flags(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["eval", "niah", "--model", "baseline:induction", "--kind", "passkey", "--lengths", "600", "--depths",
               "0.5", "--samples", "1", "--queries", "2", "--turns", "shared", "--out", str(out), "--no-progress"])
    assert rc == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [c["params"].get("mode") for c in cells] == [None, "shared"]
    assert cells[1]["options"]["niah_turns"] == ["shared"] and cells[1]["task_config"]["num_queries"] == 2
    # the induction baseline copies what followed "The pass key for KEY is" in the haystack: every turn right
    assert cells[0]["metrics"]["accuracy"] == 1.0 and cells[0]["metrics"]["n"] == 2
    assert cells[1]["metrics"]["turn_correct"] == [1, 1] and cells[1]["metrics"]["turn_n"] == [1, 1]
    assert "passkey, 2 needles, length 600, accuracy by turn:" in capsys.readouterr().out


# -- bad arguments -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"num_queries": 0}, {"num_queries": -2}, {"num_queries": 2.0},
                                    {"num_queries": True}])
def test_bad_num_queries(kwargs):
    with pytest.raises(ValueError, match="num_queries"):
        NIAHConfig(kind="number", lengths=(2048,), **kwargs)


def test_bad_queries_flag_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", "niah", "--model", "baseline:induction", "--queries", "0", "--out", str(tmp_path)]) == 2
    assert "num_queries must be an int >= 1" in capsys.readouterr().err
    assert main(["eval", "niah", "--model", "baseline:induction", "--lengths", "600", "--queries", "9",
                 "--out", str(tmp_path)]) == 2
    assert "num_queries=9 does not fit at length 600" in capsys.readouterr().err


def test_more_queries_than_fit(corpus):
    fits = min_length("uuid", 3)
    NIAHConfig(kind="uuid", lengths=(fits,), depths=(0.5,), num_queries=3, corpus_paths=corpus).build(0)  # it fits
    with pytest.raises(ValueError, match="num_queries=3 does not fit at length"):
        NIAHConfig(kind="uuid", lengths=(fits - 1, 4096), num_queries=3)
    with pytest.raises(ValueError, match="num_queries"):
        make_niah_sample("passkey", 1000, 0.5, np.random.default_rng(0), num_queries=40)


def test_bad_turn_modes():
    with pytest.raises(ValueError, match="niah_turns"):
        EvalOptions(niah_turns=("shared", "both"))
    with pytest.raises(ValueError, match="niah_turns"):
        EvalOptions(niah_turns="shared")
    with pytest.raises(SystemExit):
        main(["eval", "niah", "--model", "baseline:induction", "--turns", "shared,both"])
