"""``mnemos eval`` and ``mnemos report`` end to end, on the weight-free baselines."""

import json

from mnemos.cli import main


def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_eval_niah_then_report_merges_runs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--lengths", "300,400", "--depths", "0,1", "--samples", "1", "--no-progress"]
    assert main(["eval", "niah", "--model", "baseline:induction", "--model", "baseline:random", *common,
                 "--stream-chunk", "64", "--out", str(a)]) == 0
    out = capsys.readouterr().out
    assert "| induction-8 | 1.00 | 1.00 |" in out and "| random-bigram | 0.00 | 0.00 |" in out
    assert {p.name for p in a.iterdir()} == {"results.json", "report.md", "niah_heatmap.png",
                                              "accuracy_vs_length.png"}
    cells = _cells(a / "results.json")
    assert len(cells) == 2 * 2 * 2 and cells[0]["options"]["stream_chunk"] == 64
    assert cells[0]["task_config"] == {"type": "NIAHConfig", "kind": "passkey", "lengths": [300, 400],
                                       "depths": [0.0, 1.0], "samples_per_cell": 1, "corpus_paths": []}

    assert main(["eval", "capacity", "--model", "baseline:induction:3", "--lengths", "300,500", "--samples", "2",
                 "--seed", "1", "--no-plots", "--no-progress", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["report", str(a / "results.json"), str(b / "results.json"), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "## S-NIAH (passkey)" in out and "## Passkey state capacity" in out and "Seeds: 0, 1" in out
    assert len(_cells(tmp_path / "m" / "results.json")) == 8 + 2


def test_eval_mqar_and_lm(tmp_path, capsys):
    assert main(["eval", "mqar", "--model", "baseline:induction", "--pairs", "64:4,128:8", "--vocab-size", "256",
                 "--num-examples", "16", "--no-progress", "--out", str(tmp_path / "q")]) == 0
    assert "| induction-8 | — | 1.00 | 1.00 |" in capsys.readouterr().out
    assert main(["eval", "lm", "--model", "baseline:random", "--seq-len", "64", "--max-windows", "4",
                 "--no-progress", "--out", str(tmp_path / "lm")]) == 0
    (cell,) = _cells(tmp_path / "lm" / "results.json")
    assert cell["metrics"]["tokens"] == 4 * 64 and cell["metrics"]["loss"] > 0


def test_eval_refusal_is_reported_not_raised(tmp_path, capsys):
    assert main(["eval", "capacity", "--model", "baseline:induction", "--lengths", "300,2048", "--samples", "1",
                 "--memory-budget-gb", "0.001", "--no-plots", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "refused [1]" in out and "over the memory budget of 0.001 GiB" in out


def test_eval_and_report_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "niah", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
    assert main(["eval", "niah", "--model", "baseline:induction", "--lengths", "10", "--out", str(tmp_path)]) == 2
    assert "lengths must hold ints >= 276" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
