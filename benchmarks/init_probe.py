"""Train a run's config for a few steps under another initialisation of the memory's q / k path (or write gate).

The rows of docs/MODELS.md, "How the memory learns to recall": the recall study's MQAR configs, stopped at step
``--steps`` of their schedule (or at the config's stop accuracy), with

- ``--init successor`` / ``random``: ``memory.qk_init`` (the library's two settings);
- ``--init shift``: the conv part of the successor init alone (+1 on the current token's tap for q and v, on the
  previous token's for k), W_k left independent of W_q;
- ``--theta-bias B``: the write gate's initial bias (0 in the library: theta at half its bound; 2: 0.88 of it);
- ``--baselines``: the same ``--init`` applied to the delta-rule baselines' q / k projections and conv
  (DeltaNet, Gated DeltaNet; ``successor`` is the library's ``model.delta_qk_init``, whose default is their papers'
  random init).

    PYTHONPATH=src python benchmarks/init_probe.py \\
        results/study-recall/runs/mqar-L64-K8-lmm-d2-lr0.003-s2/config.json --init shift --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mnemos.layers import neural_memory, successor_init_
from mnemos.models import baselines
from mnemos.train.config import TrainConfig
from mnemos.train.loop import train


def install(init: str, theta_bias: float | None, with_baselines: bool) -> None:
    """Patch the layers' constructors of this process so that every model built after applies the probe's init (the
    library's own settings, ``memory.qk_init`` and ``model.delta_qk_init``, go through the config: :func:`probe_config`)."""
    memory_init = neural_memory.NeuralMemory.reset_parameters

    def reset(self):
        memory_init(self)
        with torch.no_grad():
            if theta_bias is not None:
                self.to_gates.bias[:self.heads].fill_(theta_bias)
        if init == "shift":  # (qk_init is "random" for this one: the conv's part alone)
            successor_init_(self.to_qkv, self.conv, copy_q_to_k=False)

    neural_memory.NeuralMemory.reset_parameters = reset
    if with_baselines and init == "shift":
        recurrence_init = baselines.LinearRecurrence.__init__

        def build(self, *args, **kw):
            recurrence_init(self, *args, **kw)
            if self.conv is not None:
                successor_init_(self.to_qkv, self.conv, copy_q_to_k=False)

        baselines.LinearRecurrence.__init__ = build


def probe_config(d: dict, init: str, with_baselines: bool) -> dict:
    """A run's config dict with the probe's init among the library's settings: ``memory.qk_init`` ("successor" for
    ``--init successor``, else "random"), and with ``--baselines`` ``model.delta_qk_init`` likewise."""
    d = json.loads(json.dumps(d))
    model = d.setdefault("model", {})
    model.setdefault("memory", {})["qk_init"] = "successor" if init == "successor" else "random"
    if with_baselines:
        model["delta_qk_init"] = "successor" if init == "successor" else "random"
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a run's config.json (e.g. one of results/study-recall/runs/*/config.json)")
    ap.add_argument("--init", choices=("successor", "random", "shift"), required=True)
    ap.add_argument("--theta-bias", type=float, default=None, help="the write gate's initial bias (library: 0)")
    ap.add_argument("--baselines", action="store_true", help="apply --init to DeltaNet / Gated DeltaNet too")
    ap.add_argument("--steps", type=int, default=1500, help="stop after this many steps (default %(default)s)")
    ap.add_argument("--out", required=True, help="the run directory to write")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    with open(args.config) as f:
        d = json.load(f)
    d = probe_config(d, args.init, args.baselines)
    d.setdefault("run", {}).update(out_dir=args.out, stop_after=args.steps, save_every=args.steps, progress=False)
    install(args.init, args.theta_bias, args.baselines)
    torch.set_num_threads(1)
    result = train(TrainConfig.from_dict(d))
    print(f"{args.out}: step {result.step}, validation accuracy {result.final_eval.get('val_accuracy', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
