"""`mnemos demo` end to end: the Titans model recalls pairs beyond the SWA baseline's reach, the baseline cannot.

This trains two small models for real (3-4 minutes on one CPU core, about as long on two: the LMM's small ops gain
little from a second thread): the demo's claim is the property tested. It is collected first (``longest``), so that
the parallel suite runs every other test beside it.
"""

import json

import pytest

from mnemos.train.demo import DemoConfig, run_demo


@pytest.mark.longest
def test_memory_recalls_what_the_window_lost(tmp_path, share_of_cores):
    cfg = DemoConfig(out_dir=str(tmp_path), progress=False)
    report = run_demo(cfg)
    rows = {r["model"]: r for r in report.rows}
    mem, swa = rows[cfg.memory_variant], rows["swa"]
    chance = 1 / (cfg.vocab_size - cfg.vocab_size // 2)
    assert swa["n_far"] > 1000 and mem["n_far"] == swa["n_far"]
    assert swa["far"] < chance + 0.05  # nothing beyond its reach can get through the window
    assert swa["near"] > chance + 0.1  # the baseline did learn recall where it can see
    # the memory binds keys to values beyond the window: far above answering with any value of the context (1/K)
    assert mem["far"] > 0.9 and mem["far"] > mem["any_value_level"] + 0.5, mem
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == report.rows
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "beyond reach" in (tmp_path / "demo.md").read_text()


def test_recall_by_distance_and_the_table_without_training():
    """The demo's scoring (mqar_recall_metrics) and table on a model that answers every query with its pair's value
    when the pair is within reach, and with the sample's first context value beyond it."""
    import torch
    import torch.nn.functional as F

    from mnemos.data import IGNORE_INDEX, MQARConfig
    from mnemos.train.demo import DemoReport, recall_by_distance

    cfg = DemoConfig(out_dir="unused", num_kv_pairs=4)
    inputs, labels = MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4, num_examples=50).build(0)
    pos = torch.arange(64)
    key_pos = 2 * (inputs[:, None, 0:8:2] == inputs[:, :, None]).float().argmax(-1)  # [N, L]
    near = pos - key_pos <= cfg.reach
    pred = torch.where(near & (labels != IGNORE_INDEX), labels, inputs[:, 1:2])  # far: the first context value

    def model(x):
        return F.one_hot(pred, 128).float(), None

    row = recall_by_distance(model, inputs, labels, 4, cfg.reach, 128)
    assert row["near"] == 1.0 and row["n_near"] + row["n_far"] == 200 and 0 < row["far"] < 0.5
    assert row["context_value_rate"] == row["far_context_value_rate"] == 1.0
    assert row["any_value_level"] == 0.25 and row["chance"] == 1 / 64
    report = DemoReport(cfg, [{"model": "m", "seq_len": 64, "train_s": 1.0, **row}])
    assert "| 1.00 (1.00) | 1 s |" in report.table() and "1/K = 0.25" in report.table()


def test_the_demo_takes_the_rule_family_memory_only_and_rejects_other_variants(capsys):
    """The rule family's models (moneta, yaad, memora, atlas) are demo variants, memory-only like lmm; the Titans
    models with attention are not memory-only; anything else is refused by the config (naming every variant) and by
    the command line."""
    from mnemos.cli import main
    from mnemos.models import VARIANTS
    from mnemos.train.demo import DEMO_VARIANTS, RULE_VARIANTS

    assert set(DEMO_VARIANTS) <= set(VARIANTS)
    for v in DEMO_VARIANTS:
        assert DemoConfig(memory_variant=v).memory_only == (v == "lmm" or v in RULE_VARIANTS)
    assert not DemoConfig(memory_variant="mag").memory_only
    with pytest.raises(ValueError, match="memory_variant must be one of lmm, mal, mag, mac, moneta, yaad, memora, "
                                         "atlas, got 'swa'"):
        DemoConfig(memory_variant="swa")
    with pytest.raises(SystemExit):
        main(["demo", "--variant", "transformer"])
    assert "invalid choice: 'transformer'" in capsys.readouterr().err
