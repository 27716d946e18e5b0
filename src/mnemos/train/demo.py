"""``mnemos demo``: train a Titans model and a sliding-window-attention baseline of the same size on associative
recall, then show, by how far back each answer lies, that the neural memory recalls what the window has lost.

Both models see the same data (MQAR: K key-value pairs at the start, queries later), the same sizes and the same
steps. The SWA model stacks ``n_layers`` windows of W tokens, so nothing further back than its receptive field
``n_layers * (W - 1)`` can reach a query: beyond it, it can only guess (chance 2 / vocab). The memory model has the
same window plus a neural memory written at test time. Every number printed comes from the run itself.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model_weights
from ..data import MQARConfig, mqar_recall_metrics
from ..models import MnemosLM
from ..models.config import ATTENTION_VARIANTS, TITANS_VARIANTS
from .config import load_config
from .loop import train


PAPER_VARIANTS = ("lmm", "mal", "mag", "mac")  # the Titans paper's four
# the rest of the registry's Titans family: the memory-only models of the rule's family (docs/MODELS.md, "The Miras and
# Atlas memories")
RULE_VARIANTS = tuple(v for v in TITANS_VARIANTS if v not in PAPER_VARIANTS)
DEMO_VARIANTS = PAPER_VARIANTS + RULE_VARIANTS


@dataclass
class DemoConfig:
    # the memory model: a Titans model (lmm, mal, mag, mac; docs/MODELS.md: MAL and MAC learn slower) or a memory-only
    # model of its family (moneta, yaad, memora, atlas)
    memory_variant: str = "lmm"
    steps: int = 800
    vocab_size: int = 64
    num_kv_pairs: int = 8
    seq_len: int = 64  # training and evaluation length: 8 pairs up front, queries up to 48 tokens later
    # MQAR noise between the queries (mnemos.data.MQARConfig.noise): "disjoint" never repeats a key, so vocab 64 may
    # equal the length; Zoology's noise needs vocab > length and learns far slower at this budget
    noise: str = "disjoint"
    window: int = 8
    d_model: int = 64
    n_layers: int = 2
    max_lr: float | None = None  # the memory's step bound; None: the library's default (memory.max_lr)
    seed: int = 0
    out_dir: str = "runs/demo"
    progress: bool = True

    def __post_init__(self):
        if self.memory_variant not in DEMO_VARIANTS:
            raise ValueError(f"memory_variant must be one of {', '.join(DEMO_VARIANTS)}, got {self.memory_variant!r}")
        for name in ("steps", "num_kv_pairs", "seq_len", "window", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def memory_only(self) -> bool:
        """Whether the memory model has no attention at all (lmm and the rule family's models)."""
        return self.memory_variant not in ATTENTION_VARIANTS

    @property
    def reach(self) -> int:
        """How far back the SWA stack can see: n_layers * (window - 1) tokens."""
        return self.n_layers * (self.window - 1)


@dataclass
class DemoReport:
    config: DemoConfig
    rows: list[dict] = field(default_factory=list)  # one per (model, eval length)

    def table(self) -> str:
        r, level = self.config.reach, 1 / self.config.num_kv_pairs
        lines = [f"| model | eval length | within reach (<= {r} back) | beyond reach (> {r} back) | "
                 f"answers a context value (beyond reach) | train time |", "|---|---|---|---|---|---|"]
        for row in self.rows:
            lines.append(f"| {row['model']} | {row['seq_len']} | {row['near']:.2f} ({row['n_near']}) | "
                         f"{row['far']:.2f} ({row['n_far']}) | {row['context_value_rate']:.2f} "
                         f"({row['far_context_value_rate']:.2f}) | {row['train_s']:.0f} s |")
        lines.append(f"\nA model that answers every query with a random value of its own context scores 1/K = "
                     f"{level:.2f} with a context-value rate of 1.00.")
        return "\n".join(lines)


def recall_by_distance(model: MnemosLM, inputs: torch.Tensor, labels: torch.Tensor, num_kv_pairs: int,
                       reach: int, vocab_size: int | None = None) -> dict:
    """Accuracy at the MQAR queries, split by how far back the queried pair sits (within / beyond ``reach``): ``near``,
    ``n_near``, ``far``, ``n_far``, plus :func:`mnemos.data.mqar_recall_metrics`' ``accuracy``,
    ``context_value_rate`` (answers that are one of the sample's values, right or wrong), ``far_context_value_rate``
    and ``any_value_level`` (1/K: a random context value's accuracy), and ``chance`` when ``vocab_size`` is given."""
    with torch.no_grad():
        pred = model(inputs)[0].argmax(-1)  # [N, L]
    m = mqar_recall_metrics(pred, inputs, labels, num_kv_pairs, reach, vocab_size=vocab_size)
    keep = ("accuracy", "context_value_rate", "far_context_value_rate", "any_value_level", "chance")
    return {"near": m["near_accuracy"], "n_near": m["n_near"], "far": m["far_accuracy"], "n_far": m["n_far"],
            **{k: m[k] for k in keep if k in m}}


def run_demo(cfg: DemoConfig) -> DemoReport:
    out = Path(cfg.out_dir)
    report = DemoReport(cfg)
    common = [
        f"model.vocab_size={cfg.vocab_size}", f"task.vocab_size={cfg.vocab_size}", f"model.d_model={cfg.d_model}",
        f"model.n_layers={cfg.n_layers}", "model.n_heads=4", f"model.window={cfg.window}",
        f"model.segment_len={cfg.seq_len // 2}", f"task.seq_len={cfg.seq_len}", f"task.noise={cfg.noise}",
        f"task.num_kv_pairs={cfg.num_kv_pairs}", f"run.steps={cfg.steps}", "run.batch_size=32",
        f"run.eval_every={cfg.steps}", "optim.lr=3e-3", "optim.warmup_steps=100",
        "optim.min_lr_ratio=1.0",  # no decay: a short run decayed early stays on the plateau (recall diagnosis)
        f"run.seed={cfg.seed}", f"run.progress={cfg.progress}",
    ] + ([] if cfg.max_lr is None else [f"model.memory.max_lr={cfg.max_lr}"])
    for variant in (cfg.memory_variant, "swa"):
        run_cfg = load_config(None, common + [f"model.variant={variant}", f"run.out_dir={out / variant}"])
        t0 = time.perf_counter()
        result = train(run_cfg)
        train_s = time.perf_counter() - t0
        model = MnemosLM(run_cfg.model)
        load_model_weights(out / variant / "checkpoint", model)
        model.eval()
        for length in (cfg.seq_len,):  # every query past position `reach` is beyond the window's reach
            data = MQARConfig(vocab_size=cfg.vocab_size, seq_len=length, num_kv_pairs=cfg.num_kv_pairs,
                              num_examples=500, noise=cfg.noise).build(cfg.seed + 12345)
            row = recall_by_distance(model, *data, cfg.num_kv_pairs, cfg.reach, cfg.vocab_size)
            report.rows.append({"model": variant, "seq_len": length, "train_s": train_s,
                                "final_train_loss": result.train_losses[-1], **row})
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"config": asdict(cfg), "rows": report.rows}, indent=2))
    (out / "demo.md").write_text(report.table() + "\n")
    _plot(report, out / "demo.png")
    return report


def _plot(report: DemoReport, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no demo.png (pip install 'mnemos[plots]')", file=sys.stderr)
        return
    cfg = report.config
    lengths = sorted({r["seq_len"] for r in report.rows})
    # every model's name under its bars, never overlapping: a slot of ~0.09 in per character (10 pt) for each model,
    # or, when that would make a panel wider than 8 in, names turned upright in slots of 0.35 in
    n_models = max(sum(r["seq_len"] == length for r in report.rows) for length in lengths)
    chars = max(len(str(r["model"])) for r in report.rows)
    upright = (0.09 * chars + 0.25) * n_models > 8.0
    width = max(5.0, (0.35 if upright else 0.09 * chars + 0.25) * n_models + 0.8)
    height = 3.6 + (0.08 * chars if upright else 0.0)  # upright names take height instead of width
    fig, axes = plt.subplots(1, len(lengths), figsize=(width * len(lengths), height), dpi=120, sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, length in zip(axes, lengths, strict=True):
        rows = [r for r in report.rows if r["seq_len"] == length]
        for i, r in enumerate(rows):
            ax.bar([i - 0.2, i + 0.2], [r["near"], r["far"]], width=0.38,
                   color=["#8da0cb", "#fc8d62"], edgecolor="black", linewidth=0.5)
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=90 if upright else 0)
        ax.axhline(2 / cfg.vocab_size, color="gray", ls="--", lw=1)
        ax.axhline(1 / cfg.num_kv_pairs, color="black", ls=":", lw=1)
        ax.set_title(f"MQAR, {length} tokens")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("recall accuracy")
    from matplotlib.patches import Patch

    axes[-1].legend(handles=[Patch(color="#8da0cb", label=f"pair <= {cfg.reach} tokens back"),
                             Patch(color="#fc8d62", label=f"pair > {cfg.reach} tokens back"),
                             plt.Line2D([], [], color="gray", ls="--", label="chance"),
                             plt.Line2D([], [], color="black", ls=":",
                                        label="any value of the context (1/K)")], fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
