"""JRT-Prompt (``mnemos eval --jrt``, mnemos.eval.jrt): the repeated prompt's tokens, where the labels sit and which
positions are scored (MQAR, on constructed examples and through the harness with oracles that know either the JRT or
the plain positions); near / far measured to the second copy; the text tasks' prompts; refusal of a task without a
separable context; the cells and the report section."""

from __future__ import annotations

import json

import pytest
import torch
from eval_stubs import AnswerKeyLM

from mnemos.cli import main
from mnemos.data import IGNORE_INDEX, ByteTokenizer, LMDataConfig, MQARConfig, NIAHConfig
from mnemos.eval import EvalOptions, evaluate
from mnemos.eval.jrt import JRT_SUFFIX, jrt_mqar, jrt_mqar_predictions, jrt_text, repeat_context
from mnemos.eval.reference_models import InductionLM
from mnemos.eval.runner import prompt_ids

OPTS = dict(progress=False)


def test_mqar_jrt_prompt_is_exact_on_a_constructed_example():
    # MQARConfig's worked example: pairs 4->15, 7->14, 5->8; queries 7 at 6, 4 at 8, 5 at 10
    inputs, labels = MQARConfig(vocab_size=16, seq_len=12, num_kv_pairs=3, num_examples=1).build(seed=0)
    assert inputs[0].tolist() == [4, 15, 7, 14, 5, 8, 7, 8, 4, 14, 5, 13]
    ids, lab = jrt_mqar(inputs, labels, 3)
    assert ids[0].tolist() == [4, 15, 7, 14, 5, 8, 4, 15, 7, 14, 5, 8, 7, 8, 4, 14, 5, 13]
    X = IGNORE_INDEX
    assert lab[0].tolist() == [X] * 12 + [14, X, 15, X, 8, X]
    q = (lab[0] != X).nonzero().flatten().tolist()
    assert q == [12, 14, 16]  # the plain query positions 6, 8, 10 moved by 2K = 6
    assert ids[0, q].tolist() == [7, 4, 5]  # still the query tokens, each labelled with its value
    # the scored positions: the last L of the JRT predictions, aligned with the plain sample
    pred = torch.arange(18)[None]
    assert jrt_mqar_predictions(pred, 3)[0].tolist() == list(range(6, 18))
    assert jrt_mqar_predictions(pred, 3)[0, [6, 8, 10]].tolist() == q


def test_repeat_context_checks_and_text_prompts():
    ids, lab = repeat_context(torch.tensor([[1, 2, 3, 9]]), 3)
    assert ids.tolist() == [[1, 2, 3, 1, 2, 3, 9]] and lab is None
    with pytest.raises(ValueError, match="n_context"):
        repeat_context(torch.tensor([1, 2]), 0)
    assert jrt_text("ctx. Q?", "Q?") == "ctx. ctx. Q?"
    with pytest.raises(ValueError, match="ends with its question"):
        jrt_text("ctx", "Q?")
    # a NIAH sample: byte tokens, the context (everything before the question) twice, then the question
    (s,) = NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=1).build(0)
    model = InductionLM(vocab_size=260)
    jrt = prompt_ids(model, s, jrt=True)
    n_q = len(s.question.encode())
    n_c = s.input_ids.numel() - n_q
    assert jrt.tolist() == list((s.prompt[: len(s.prompt) - len(s.question)] * 2 + s.question).encode())
    assert torch.equal(jrt[:n_c], jrt[n_c : 2 * n_c]) and torch.equal(jrt[2 * n_c :], s.input_ids[n_c:])
    assert torch.equal(prompt_ids(model, s), s.input_ids)  # the plain prompt is untouched
    # a model with its own tokenizer: the text context + context + question, encoded once
    model.tokenizer = ByteTokenizer()
    assert prompt_ids(model, s, jrt=True).tolist() == ByteTokenizer().encode(jrt_text(s.prompt, s.question))


def test_harness_scores_the_jrt_positions_and_keeps_the_plain_score():
    """An oracle that knows the JRT labels scores 1 on the JRT cells only if they are scored at the moved query tokens;
    one that knows the plain positions scores 1 on the plain cells and ~0 on the JRT ones (its answers are 2K
    tokens early). near / far counts match the plain cell's: distances are measured to the second copy."""
    cfg = MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=4, num_examples=6, noise="disjoint")
    inputs, labels = cfg.build(0)
    reach = 10
    opts = EvalOptions(jrt=True, mqar_reach=reach, **OPTS)
    jrt_oracle = AnswerKeyLM(64, mqar=(*jrt_mqar(inputs, labels, 4), 4))
    # the plain labels, padded to the JRT length (the oracle keys a sample by its first 2K tokens, the same in both)
    padded = torch.cat([labels, torch.full_like(labels[:, :8], IGNORE_INDEX)], 1)
    plain_oracle = AnswerKeyLM(64, mqar=(inputs, padded, 4))
    plain_oracle.name = "plain-oracle"
    res = evaluate([jrt_oracle, plain_oracle], cfg, options=opts)
    cells = {c.model_name: c for c in res.cells}
    assert list(cells) == ["oracle", "oracle" + JRT_SUFFIX, "plain-oracle", "plain-oracle" + JRT_SUFFIX]
    assert cells["oracle" + JRT_SUFFIX].metrics["accuracy"] == 1.0
    assert cells["plain-oracle"].metrics["accuracy"] == 1.0  # the plain score, as without --jrt
    assert cells["plain-oracle" + JRT_SUFFIX].metrics["accuracy"] < 0.3
    plain, jrt = cells["plain-oracle"].metrics, cells["oracle" + JRT_SUFFIX].metrics
    assert (jrt["n"], jrt["n_near"], jrt["n_far"]) == (plain["n"], plain["n_near"], plain["n_far"])
    rows, t = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    slot = torch.stack([(inputs[r, 0:8:2] == inputs[r, c]).nonzero()[0, 0] for r, c in zip(rows, t, strict=True)])
    assert jrt["n_near"] == int(((t - 2 * slot) <= reach).sum())  # query minus the key's plain = 2nd-copy position
    d = cells["oracle" + JRT_SUFFIX].model
    assert d["jrt_prompt"] is True and d["jrt_base"] == "oracle" and "jrt_prompt" not in cells["oracle"].model
    # the plain cells equal those of a run without --jrt (the options aside)
    alone = evaluate(plain_oracle, cfg, options=EvalOptions(mqar_reach=reach, **OPTS)).cells[0]
    assert alone.metrics.keys() == plain.keys()
    assert all(alone.metrics[k] == plain[k] for k in plain if k != "tokens_per_second")


def test_shared_context_turns_with_jrt():
    cfg = MQARConfig(vocab_size=64, seq_len=40, num_kv_pairs=4, num_examples=3, noise="disjoint")
    inputs, labels = cfg.build(0)
    oracle = AnswerKeyLM(64, mqar=(*jrt_mqar(inputs, labels, 4), 4))
    res = evaluate(oracle, cfg, options=EvalOptions(jrt=True, mqar_turns=("shared",), **OPTS))
    turns = [c for c in res.cells if c.model_name.endswith(JRT_SUFFIX) and "mode" in c.params]
    assert len(turns) == 1 and turns[0].metrics["accuracy"] == 1.0


def test_text_task_jrt_cells_and_the_lm_refusal(tmp_path, capsys):
    (s,) = NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=1).build(0)
    jrt_ids = repeat_context(s.input_ids, s.input_ids.numel() - len(s.question.encode()))[0]
    oracle = AnswerKeyLM(260, prompts={tuple(jrt_ids.tolist()): s.answer})  # knows the JRT prompt only
    res = evaluate(oracle, NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=1),
                   options=EvalOptions(jrt=True, **OPTS))
    acc = {c.model_name: c.metrics["accuracy"] for c in res.cells}
    assert acc == {"oracle": 0.0, "oracle" + JRT_SUFFIX: 1.0}
    assert "## JRT-Prompt" in res.markdown() and "| niah | kind=passkey length=300 depth=0.5 | oracle | 0.00 | " \
        "1.00 | +1.00 |" in res.markdown()
    # a task without a separable context: an error naming it, before anything runs
    with pytest.raises(ValueError, match="task lm has no context"):
        evaluate(oracle, LMDataConfig(seq_len=16), options=EvalOptions(jrt=True, **OPTS))
    assert main(["eval", "lm", "--model", "baseline:random", "--jrt", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "--jrt" in capsys.readouterr().err and not (tmp_path / "results.json").exists()
    # the flag reaches the harness; the report and results.json name both
    assert main(["eval", "mqar", "--model", "baseline:induction", "--pairs", "32:4", "--vocab-size", "64",
                 "--noise", "disjoint", "--num-examples", "4", "--jrt", "--no-plots", "--no-progress", "--out",
                 str(tmp_path / "q")]) == 0
    cells = json.loads((tmp_path / "q" / "results.json").read_text())["cells"]
    assert [c["model"]["name"] for c in cells] == ["induction-8", "induction-8" + JRT_SUFFIX]
    assert all(c["options"]["jrt"] is True for c in cells)
    assert "| mqar | seq_len=32 num_kv_pairs=4 vocab_size=64 | induction-8 | 1.00 | 1.00 | +0.00 |" in \
        (tmp_path / "q" / "report.md").read_text()
