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
                                       "depths": [0.0, 1.0], "samples_per_cell": 1, "corpus_paths": [],
                                       "num_queries": 1}

    assert main(["eval", "capacity", "--model", "baseline:induction:3", "--lengths", "300,500", "--samples", "2",
                 "--seed", "1", "--no-plots", "--no-progress", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["report", str(a / "results.json"), str(b / "results.json"), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "## S-NIAH (passkey)" in out and "## Passkey state capacity" in out and "Seeds: 0, 1" in out
    assert len(_cells(tmp_path / "m" / "results.json")) == 8 + 2


def test_eval_mqar_and_lm(tmp_path, capsys):
    assert main(["eval", "mqar", "--model", "baseline:induction", "--pairs", "64:4,128:8", "--vocab-size", "256",
                 "--noise", "disjoint", "--num-examples", "16", "--no-progress", "--out", str(tmp_path / "q")]) == 0
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


def _mqar_checkpoint(path, **task):
    """A tiny untrained swa checkpoint whose run config says it was trained on the MQAR ``task``."""
    import torch

    from mnemos.models import MnemosConfig, MnemosLM
    from mnemos.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MnemosLM(MnemosConfig(variant="swa", vocab_size=96, d_model=16, n_layers=2, n_heads=2, window=4))
    return save_checkpoint(path, model, step=1, config={"model": model.config.to_dict(),
                                                        "task": {"kind": "mqar", **task}})


def test_eval_mqar_reads_the_task_from_the_checkpoint(tmp_path, capsys):
    """Without --vocab-size / --pairs (/ --power-a / --noise) the task is the one the checkpoint trained on; a flag
    given wins; checkpoints that disagree are an error."""
    task = {"vocab_size": 96, "seq_len": 40, "num_kv_pairs": 5, "power_a": 0.5, "noise": "disjoint"}
    ckpt = _mqar_checkpoint(tmp_path / "run" / "checkpoint", **task)
    common = ["--num-examples", "4", "--no-progress", "--no-plots"]
    assert main(["eval", "mqar", "--model", str(ckpt), *common, "--out", str(tmp_path / "a")]) == 0
    assert "MQAR task from the checkpoint: vocab_size 96, power_a 0.5, noise disjoint, seq_len 40" in \
        capsys.readouterr().err
    (cell,) = _cells(tmp_path / "a" / "results.json")
    assert {k: cell["task_config"][k] for k in task} == task
    assert cell["metrics"]["reach"] == 2 * 3  # auto: the swa model's n_layers * (window - 1)

    assert main(["eval", "mqar", "--model", str(ckpt), "--model", "baseline:random", "--pairs", "48:6",
                 "--noise", "zoology", "--reach", "none", *common, "--out", str(tmp_path / "b")]) == 0
    cells = _cells(tmp_path / "b" / "results.json")
    assert [c["task_config"]["seq_len"] for c in cells] == [48, 48] and cells[0]["task_config"]["noise"] == "zoology"
    assert cells[0]["task_config"]["vocab_size"] == 96 and "reach" not in cells[0]["metrics"]

    other = _mqar_checkpoint(tmp_path / "other", **{**task, "num_kv_pairs": 4})
    capsys.readouterr()
    assert main(["eval", "mqar", "--model", str(ckpt), "--model", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert "trained on different MQAR tasks: task.num_kv_pairs is 5 in" in err and str(other) in err
    assert main(["eval", "mqar", "--model", str(ckpt), "--model", str(other), "--pairs", "40:4", *common,
                 "--out", str(tmp_path / "c")]) == 0  # the flag settles what they disagree on
