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
