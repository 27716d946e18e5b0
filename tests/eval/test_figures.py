"""Every figure mnemos draws, at many models and grid points: no two tick labels of an axis overlap (text extents
measured by matplotlib after layout: tests/figure_checks.py)."""

import json
import random
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")

from figure_checks import assert_no_tick_label_overlap, saved_figures, tick_label_overlaps  # noqa: E402

from mnemos.eval.plots import plot_accuracy_vs_length  # noqa: E402
from mnemos.eval.results import Cell, EvalResults  # noqa: E402
from mnemos.eval.tasks.mqar import plot_mqar_state_size  # noqa: E402
from mnemos.eval.tasks.niah import plot_niah_heatmap  # noqa: E402

FAMILIES = ("lmm", "mac", "mag", "mal", "swa", "transformer", "deltanet", "gated_deltanet", "linear_attention")


def _cell(task, model, params, metrics, status="ok", variant=None):
    return Cell(task=task, model={"name": model, **({"variant": variant} if variant else {})}, seed=0,
                task_config={}, params=params, status=status, metrics=metrics,
                options={"capacity_threshold": 0.95})


def _models(n):
    return [(f"{FAMILIES[i % len(FAMILIES)]}-d{64 * (1 + i // len(FAMILIES))}", FAMILIES[i % len(FAMILIES)])
            for i in range(n)]


def _one(figures):
    assert len(figures) == 1, f"expected one saved figure, got {len(figures)}"
    return figures[0]


def test_the_check_finds_overlapping_labels_and_passes_clean_ones():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.set_xticks(range(20), [f"label number {i}" for i in range(20)])
    ax.set_yticks([0, 1], ["a", "b"])
    problems = tick_label_overlaps(fig)
    assert problems and all(" x: " in p for p in problems)  # the crowded x axis, not the clean y axis
    ax.set_xticks([0, 19], ["left", "right"])
    assert tick_label_overlaps(fig) == []


@pytest.mark.parametrize("sizes", [
    pytest.param([1800 + 2200 * i for i in range(12)], id="within-1.5-decades"),  # minor labels 2x10^3, 3x10^3, ...
    pytest.param([int(500 * 2.9 ** i) for i in range(12)], id="over-5-decades"),
    pytest.param([1000 + 40 * i for i in range(12)], id="within-a-tenth-of-a-decade"),
])
def test_mqar_state_size(tmp_path, sizes):
    rng = random.Random(0)
    cells = [_cell("mqar", name, {"seq_len": L, "num_kv_pairs": L // 16, "vocab_size": 8192},
                   {"correct": rng.randint(0, 50), "n": 50, "state_numel": size}, variant=variant)
             for (name, variant), size in zip(_models(len(sizes)), sizes, strict=True) for L in (64, 128, 256, 512)]
    with saved_figures() as figures:
        assert plot_mqar_state_size(EvalResults(cells), tmp_path / "s.png") is not None
    assert_no_tick_label_overlap(_one(figures))


@pytest.mark.parametrize("lengths", [
    pytest.param([2**k for k in range(8, 22)], id="14-powers-of-2"),
    pytest.param([300, 350, 400, 450, 500, 600, 700, 800, 1000, 1200, 1500, 2048, 3000, 4096], id="close-lengths"),
])
def test_accuracy_vs_length(tmp_path, lengths):
    rng = random.Random(0)
    cells = [_cell("capacity", name, {"length": L}, {"correct": rng.randint(0, 4), "n": 4})
             for name, _ in _models(12) for L in lengths]
    cells += [_cell("niah", name, {"kind": kind, "length": L, "depth": 0.5}, {"correct": rng.randint(0, 4), "n": 4})
              for name, _ in _models(12) for kind in ("passkey", "number") for L in lengths]
    with saved_figures() as figures:
        assert plot_accuracy_vs_length(EvalResults(cells), tmp_path / "a.png") is not None
    assert_no_tick_label_overlap(_one(figures))


def test_niah_heatmap(tmp_path):
    rng = random.Random(0)
    lengths = [300, 400, 500, 700, 1000, 2048, 4096, 2**14, 2**16, 2**20]
    depths = [i / 20 for i in range(21)]
    cells = [_cell("niah", name, {"kind": "passkey", "length": L, "depth": d}, {"correct": rng.randint(0, 1), "n": 1})
             for name, _ in _models(2) for L in lengths for d in depths]
    with saved_figures() as figures:
        assert plot_niah_heatmap(EvalResults(cells), tmp_path / "h.png") is not None
    assert_no_tick_label_overlap(_one(figures))


def test_study_figures(tmp_path):
    from mnemos.eval.study import _plot_curves, _plot_extrapolation

    rng = random.Random(0)
    labels = [name for name, _ in _models(12)]
    trains = [SimpleNamespace(point="L64-K4", label=label, lr=1e-3, name=f"run-{label}") for label in labels]
    for t in trains:
        run = tmp_path / "runs" / t.name
        run.mkdir(parents=True)
        rows = [{"step": s, "split": "val", "val_accuracy": rng.random()} for s in range(100, 20001, 100)]
        run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = SimpleNamespace(models=labels, main=(64, 4), stop_at_accuracy=0.99, point_models=lambda key: labels)
    chosen = {("L64-K4", label): {"lr": 1e-3} for label in labels}
    lengths = [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384]
    extrap = EvalResults([_cell("mqar", label, {"seq_len": L, "num_kv_pairs": 4, "vocab_size": 8192},
                                {"correct": rng.randint(0, 50), "n": 50}) for label in labels for L in lengths])
    with saved_figures() as figures:
        assert _plot_curves(settings, trains, chosen, tmp_path) is not None
        assert _plot_extrapolation(extrap, tmp_path) is not None
    assert len(figures) == 2
    for fig in figures:
        assert_no_tick_label_overlap(fig)


def test_demo_figure(tmp_path):
    from mnemos.train.demo import DemoConfig, DemoReport, _plot

    report = DemoReport(DemoConfig(), rows=[
        {"model": name, "seq_len": L, "near": 0.9, "far": 0.3} for L in (64, 128, 256) for name, _ in _models(12)])
    with saved_figures() as figures:
        _plot(report, tmp_path / "demo.png")
    assert_no_tick_label_overlap(_one(figures))


@pytest.mark.parametrize("losses", [
    pytest.param([5.0 - 1e-4 * i for i in range(3000)], id="narrow-range"),
    pytest.param([5.0 * 0.998 ** i for i in range(3000)], id="three-decades"),
    pytest.param([5.0 - 3.0 * i / 3000 for i in range(3000)], id="within-a-decade"),
])
def test_loss_curve(tmp_path, losses):
    from mnemos.train.loop import _write_curve

    with saved_figures() as figures:
        _write_curve(tmp_path, 0, losses)
    assert_no_tick_label_overlap(_one(figures))
