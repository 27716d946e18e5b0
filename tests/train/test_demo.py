"""`mnemos demo` end to end: the Titans model recalls pairs beyond the SWA baseline's reach, the baseline cannot.

This trains two small models for real (about 2 minutes on 2 CPU cores): the demo's claim is the property tested.
"""

import json

from mnemos.train.demo import DemoConfig, run_demo


def test_memory_recalls_what_the_window_lost(tmp_path):
    cfg = DemoConfig(out_dir=str(tmp_path), progress=False)
    report = run_demo(cfg)
    rows = {r["model"]: r for r in report.rows}
    chance = 2 / cfg.vocab_size
    assert rows["swa"]["n_far"] > 500 and rows["mag"]["n_far"] == rows["swa"]["n_far"]
    assert rows["swa"]["far"] < chance + 0.05  # nothing beyond its reach can get through the window
    assert rows["mag"]["far"] > rows["swa"]["far"] + 0.08  # the memory carries it
    assert rows["swa"]["near"] > chance + 0.1  # the baseline did learn recall where it can see
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == report.rows
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "beyond reach" in (tmp_path / "demo.md").read_text()
