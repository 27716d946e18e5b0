"""Results JSON, merged reports and figures."""

import json
import struct
import sys

import pytest
from eval_stubs import AnswerKeyLM, TinyAttentionLM, TinyRecurrentLM

from mnemos.data import MQARConfig, NIAHConfig, PasskeyCapacityConfig
from mnemos.eval import (
    EvalOptions,
    EvalResults,
    InductionLM,
    MnemosLMAdapter,
    capacity_summary,
    config_from_dict,
    evaluate,
    report,
    write_report,
)
from mnemos.eval.plots import make_figures
from mnemos.eval.tables import pool

BYTES = 259
QUIET = EvalOptions(progress=False)
NIAH = NIAHConfig(kind="passkey", lengths=(300, 400), depths=(0.0, 0.5, 1.0), samples_per_cell=1)
CAPACITY = PasskeyCapacityConfig(lengths=(300, 400, 500), samples_per_length=2)
MQAR = MQARConfig(vocab_size=BYTES, seq_len=64, num_kv_pairs=4, num_examples=4)


@pytest.fixture(scope="module")
def results() -> EvalResults:
    """Four models on NIAH, capacity and MQAR; the attention model is refused past 350 tokens."""
    models = [
        InductionLM(BYTES),
        MnemosLMAdapter(TinyRecurrentLM(BYTES, dim=4), name="recurrent-4"),
        MnemosLMAdapter(TinyRecurrentLM(BYTES, dim=32), name="recurrent-32"),
        MnemosLMAdapter(TinyAttentionLM(BYTES, max_context=350), name="attention-350"),
    ]
    return evaluate(models, [NIAH, CAPACITY, MQAR], options=QUIET)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_json_round_trip(results, tmp_path):
    path = results.save(tmp_path / "r.json")
    back = EvalResults.load(path)
    assert back == results
    assert json.loads(path.read_text())["schema"] == "mnemos.eval.results/1"
    cell = back.cells[0]
    assert cell.seed == 0 and cell.model["name"] == "induction-8"
    assert {"mnemos", "torch", "python", "git_commit"} <= set(cell.versions)
    assert config_from_dict(cell.task_config) == NIAH
    assert config_from_dict(back.of_task("mqar")[0].task_config) == MQAR
    refused = [c for c in back.cells if c.status == "refused"]
    assert refused and all("max context" in c.message for c in refused)


def test_bad_results_files_are_clear_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"cells": []}')
    with pytest.raises(ValueError, match="not a mnemos results file"):
        EvalResults.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot read"):
        EvalResults.load(tmp_path / "missing.json")


def test_markdown_tables(results):
    md = results.markdown()
    for heading in ("## MQAR", "## S-NIAH (passkey)", "## Passkey state capacity", "## Notes"):
        assert heading in md
    assert "| induction-8 | 1.00 | 1.00 | 1.00 | 500 |" in md  # capacity row: longest length at >= 0.95
    assert "| attention-350 | 0.00 | refused [1] | refused [2] | none |" in md
    assert capacity_summary(results) == {"induction-8": 500, "recurrent-4": None, "recurrent-32": None,
                                         "attention-350": None}


def test_mqar_detail_table_pools_counts_over_seeds():
    """Below the accuracy table: near / far, the context-value rates beside 1/K and chance, pooled from the counts
    of every seed's cell (so two seeds give one row)."""
    cfg = MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4, num_examples=6)
    runs = [evaluate(AnswerKeyLM(128, mqar=(*cfg.build(seed), 4)), cfg, seed=seed,
                     options=EvalOptions(progress=False, mqar_reach=10)) for seed in (0, 1)]
    merged = runs[0].merge(runs[1])
    md = merged.markdown()
    assert "### MQAR: recall by distance" in md
    assert "| oracle | 64 | 4 | 10 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 0.25 | 0.016 |" in md
    (p,) = pool(merged, "mqar")
    assert p.rate("near_correct", "n_near") == 1.0 and sum(c.metrics["n_near"] for c in p.cells) > 0
    assert p.rate("missing", "n") is None


def test_figures_are_real_pngs(results, tmp_path):
    paths = make_figures(results, tmp_path)
    # each task's own figures in registration order (mqar, niah), then the one the length-swept tasks share
    assert [p.name for p in paths] == ["mqar_state_size.png", "niah_heatmap.png", "accuracy_vs_length.png"]
    for p in paths:
        width, height = _png_size(p)
        assert width >= 400 and height >= 250, (p.name, width, height)
        assert p.stat().st_size > 15_000, p.name


def test_no_state_size_figure_without_two_state_sizes(tmp_path):
    one = evaluate(MnemosLMAdapter(TinyRecurrentLM(BYTES)), MQAR, options=QUIET)
    assert make_figures(one, tmp_path) == []


def test_report_merges_two_runs(tmp_path):
    cfg = NIAHConfig(kind="passkey", lengths=(300,), depths=(0.5,), samples_per_cell=2)
    run_a = evaluate(InductionLM(BYTES), cfg, seed=0, options=QUIET)
    oracle_b = AnswerKeyLM(BYTES, prompts={tuple(s.input_ids.tolist()): "wrong" for s in cfg.build(seed=1)})
    run_b = evaluate([InductionLM(BYTES), oracle_b], cfg, seed=1, options=QUIET)
    a, b = run_a.save(tmp_path / "a.json"), run_b.save(tmp_path / "b.json")
    written = report([a, b, a], tmp_path / "out")  # a twice: its cells are kept once
    assert {p.name for p in written} == {"results.json", "report.md", "niah_heatmap.png", "accuracy_vs_length.png"}
    merged = EvalResults.load(tmp_path / "out" / "results.json")
    assert len(merged.cells) == 3 and {c.seed for c in merged.cells} == {0, 1}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Seeds: 0, 1" in md
    assert "| induction-8 | 1.00 |" in md and "| oracle | 0.00 |" in md  # two seeds pooled into one row
    assert md.count("| induction-8 |") == 1 + 0  # one summary row (detail rows start with the depth)


def test_missing_matplotlib_loses_only_the_figures(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"mnemos\[plots\]"):
        write_report(results, tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.md").is_file()
    assert write_report(results, tmp_path / "np", plots=False)[-1].name == "report.md"


def test_docstring_examples():
    import doctest
    import importlib

    for name in ("harness", "reference_models"):
        result = doctest.testmod(importlib.import_module(f"mnemos.eval.{name}"))
        assert result.attempted > 0 and result.failed == 0, name
