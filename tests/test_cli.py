"""The command line: the demo runs end to end on a small grid, writes JSON, and rejects bad flags clearly."""

import json
import subprocess
import sys

import pytest

from mnemos.cli import main
from mnemos.eval.memorize import MemorizeConfig, memorize_once


def test_demo_small_grid(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["memorize", "--pairs", "4,8", "--depths", "1,2", "--chunks", "1,4", "--head-dim", "16",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| depth | chunk | N=4 | N=8 |" in text
    data = json.loads(out.read_text())
    assert len(data["results"]) == 8 and data["config"]["head_dim"] == 16
    # 4 unit pairs in a 16-dim memory are far below capacity: every configuration recalls them all
    assert all(r["recall"] == 1.0 for r in data["results"])


def test_memorize_capacity_is_real():
    """Recall falls when the memory is asked to hold far more pairs than its width, and theta=0 stores nothing."""
    small = memorize_once(8, 16, 1, 1, passes=4, theta=0.2, eta=0.0, expansion=4, seed=0)
    huge = memorize_once(256, 16, 1, 1, passes=4, theta=0.2, eta=0.0, expansion=4, seed=0)
    nothing = memorize_once(32, 16, 1, 1, passes=1, theta=0.0, eta=0.0, expansion=4, seed=0)
    assert small.recall == 1.0 and huge.recall < 0.5 and nothing.cosine == 0.0


def test_demo_bad_flags(capsys):
    assert main(["memorize", "--passes", "0"]) == 2
    assert "passes must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memorize", "--pairs", "a,b"])
    with pytest.raises(ValueError, match="n_pairs"):
        MemorizeConfig(n_pairs=())


def test_console_entry_point_module():
    r = subprocess.run([sys.executable, "-m", "mnemos.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("mnemos ")


def test_threads_flag_sets_torchs_threads_before_the_work(tmp_path, capsys, monkeypatch):
    """--threads N on train, eval and demo: torch.set_num_threads(N) before the command runs; N >= 1."""
    from pathlib import Path

    import torch

    import mnemos.train.demo
    import mnemos.train.loop
    from mnemos.train.loop import TrainResult

    before = torch.get_num_threads()
    seen = []

    def fake_train(cfg, resume=False):
        seen.append(torch.get_num_threads())
        return TrainResult(Path(cfg.run.out_dir), 0, [], {}, 0.0)

    def fake_demo(cfg):
        seen.append(torch.get_num_threads())
        return mnemos.train.demo.DemoReport(cfg)

    monkeypatch.setattr(mnemos.train.loop, "train", fake_train)
    monkeypatch.setattr(mnemos.train.demo, "run_demo", fake_demo)
    try:
        assert main(["train", "--threads", "3", f"run.out_dir={tmp_path}"]) == 0
        assert main(["demo", "--threads", "2", "--steps", "1", "--out", str(tmp_path)]) == 0
        assert main(["eval", "mqar", "--threads", "3", "--model", "baseline:random", "--pairs", "32:2",
                     "--vocab-size", "64", "--num-examples", "2", "--no-progress", "--no-plots",
                     "--out", str(tmp_path / "e")]) == 0
        seen.append(torch.get_num_threads())
        assert seen == [3, 2, 3]
        cell = json.loads((tmp_path / "e" / "results.json").read_text())["cells"][0]
        assert cell["versions"]["threads"] == 3  # the results record it
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            main(["train", "--threads", bad])
        assert f"expected a number of threads >= 1, got '{bad}'" in capsys.readouterr().err


# -- usage errors: one line on stderr naming the key, exit code 2, nothing written; --debug shows the traceback ------

TRAIN_USAGE_ERRORS = [
    (["--preset", "mqar", "model.d_model=abc"], "model.d_model must be of type int, got 'abc' (str)"),
    (["--preset", "mqar", "run.steps=2.5"], "run.steps must be of type int, got 2.5 (float)"),
    (["--preset", "mqar", "optim.lr=fast"], "optim.lr must be of type float, got 'fast' (str)"),
    (["--preset", "mqar", "model.memory.chunk_size=abc"], "model.memory.chunk_size must be of type int"),
    (["--preset", "mqar", "model.memory=3"], "model.memory must be a MemoryConfig or a dict"),
    (["--preset", "mqar", "task.paths=notes.txt"], "task.paths must be a list"),
    (["--preset", "mqar", "optim.lr=[1"], "cannot parse the value of 'optim.lr' as YAML"),
    (["--preset", "mqar", "run.steps"], "an override must look like section.key=value, got 'run.steps'"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--config", "a_directory"], "config file a_directory is not a file"),
    (["--config", "broken.yaml"], "config file broken.yaml is not valid YAML"),
    (["--config", "model_is_a_number.yaml"], "model must be a section (a mapping of model.* keys), got 3 (int)"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "mqar", "model.variant=titan"], "model.variant: unknown variant 'titan'"),
    (["--preset", "mqar", "task.kind=wiki"], "task.kind must be one of"),
    (["--preset", "mqar", "model.widht=3"], "unknown MnemosConfig keys ['model.widht']"),
    (["--preset", "mqar", "model.memory.chunk=3"], "unknown MemoryConfig keys ['model.memory.chunk']"),
    (["--preset", "mqar", "modle.d_model=3"], "unknown config sections ['modle']"),
    (["--preset", "mqar", "run.steps=0"], "run.steps must be >= 1, got 0"),
    (["--preset", "mqar", "model.n_heads=3"], "model.n_heads (3) must divide model.d_model (64)"),
    (["model.vocab_size=300", "task.kind=lm", "task.paths=[no_such_text]"],
     "task.paths[0]: 'no_such_text' does not exist"),
    (["--resume", "--preset", "mqar"], "--resume: no checkpoint in runs/default/checkpoint"),
]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (run.out_dir defaults to runs/default in it) with the input files the cases name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "broken.yaml").write_text("model:\n  d_model: [64\n")
    (tmp_path / "model_is_a_number.yaml").write_text("model: 3\n")
    return tmp_path


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mnemos {command}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("args, expected", TRAIN_USAGE_ERRORS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_train_usage_errors_are_one_line_and_write_nothing(workdir, capsys, args, expected):
    before = _files(workdir)
    # were a case accepted, it would train one small step, not the preset's run
    assert main(["train", *args, "run.stop_after=1", "task.train_examples=64", "task.eval_examples=8"]) == 2
    out, err = capsys.readouterr()
    assert expected in _one_error_line(err, "train") and out == ""
    assert _files(workdir) == before  # no run directory, no metrics, no config.json


def test_eval_spec_typo_gives_the_error_alone(workdir, capsys, recwarn):
    """A typo in a model spec's overrides: its error, and not the untrained-model warning first."""
    for spec, expected in [("swa:model.d_modl=64", "['model.d_modl']"),
                           ("swa:model.d_model=abc", "model.d_model must be of type int, got 'abc'"),
                           ("no/such/checkpoint", "'no/such/checkpoint' is not a checkpoint directory")]:
        assert main(["eval", "mqar", "--model", spec, "--no-progress", "--out", "e"]) == 2
        assert expected in _one_error_line(capsys.readouterr().err, "eval")
    assert not [w for w in recwarn if "randomly initialised" in str(w.message)]
    assert _files(workdir) == ["a_directory", "broken.yaml", "model_is_a_number.yaml"]


def test_memorize_checks_its_json_path_before_running(workdir, capsys):
    assert main(["memorize", "--pairs", "4", "--depths", "1", "--chunks", "1", "--json", "missing/r.json"]) == 2
    out, err = capsys.readouterr()
    assert "--json missing/r.json: the directory missing does not exist" in _one_error_line(err, "memorize")
    assert out == ""  # refused before the runs, not after them


def test_debug_raises_with_the_traceback(workdir, capsys):
    from mnemos.models.config import ConfigTypeError

    for argv in (["--debug", "train", "--preset", "mqar", "model.d_model=abc"],
                 ["train", "--preset", "mqar", "model.d_model=abc", "--debug"]):  # before or after the subcommand
        with pytest.raises(ConfigTypeError, match="model.d_model must be of type int"):
            main(argv)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        main(["train", "--debug", "--config", "missing.yaml"])
    with pytest.raises(SystemExit) as e:  # argparse's own usage errors keep argparse's exit code 2
        main(["eval", "nosuchtask"])
    assert e.value.code == 2


def test_a_bug_is_not_reported_as_a_usage_error(workdir, monkeypatch):
    """Only the errors a user's input causes become one line; a bug deep in training keeps its exception."""
    import mnemos.train.loop

    def buggy_train(cfg, resume=False):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(mnemos.train.loop, "train", buggy_train)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["train", "--preset", "mqar"])


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_usage_error_in_a_real_process(tmp_path, debug):
    """The console command end to end: one line and exit code 2, or with --debug the traceback (exit code 1)."""
    r = subprocess.run([sys.executable, "-m", "mnemos.cli", *(["--debug"] if debug else []), "train", "--preset",
                        "mqar", "optim.lr=fast"], capture_output=True, text=True, cwd=tmp_path)
    line = "mnemos train: error: optim.lr must be of type float, got 'fast' (str)"
    if debug:
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
        assert r.stderr.strip().endswith("ConfigTypeError: optim.lr must be of type float, got 'fast' (str)")
    else:
        assert (r.returncode, r.stderr, r.stdout) == (2, line + "\n", "")
    assert _files(tmp_path) == []
