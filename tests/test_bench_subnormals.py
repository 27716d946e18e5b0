"""benchmarks/subnormals.py: times a saved run with torch's flush switch off and on, leaves it off (the process
default) afterwards and the model's weights as saved, and refuses a directory that is not a run by name."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import subnormals  # noqa: E402

from mnemos.models import MnemosConfig, MnemosLM  # noqa: E402
from mnemos.train.checkpoint import save_checkpoint  # noqa: E402


def test_a_saved_run_is_timed_both_ways_and_the_switch_is_left_off(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = MnemosConfig(variant="lmm", vocab_size=32, d_model=16, n_layers=1, n_heads=2, memory={"chunk_size": 2})
    save_checkpoint(tmp_path / "checkpoint", MnemosLM(cfg), step=0, config={"model": cfg.to_dict()})
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))  # as mnemos train writes beside it
    torch.set_flush_denormal(False)
    assert subnormals.main([str(tmp_path), "--batch", "2", "--len", "9", "--repeats", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[0] == str(tmp_path) and all(float(x) > 0 for x in line[1:])
    assert (torch.tensor([torch.finfo(torch.float32).tiny]) / 8).item() != 0.0  # IEEE arithmetic again


def test_a_directory_without_a_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="expected a run directory with config.json and checkpoint/"):
        subnormals.main([str(tmp_path)])
