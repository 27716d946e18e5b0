"""MQAR accuracy by the distance from each query back to its key, for trained checkpoints: where in the context a
model's recall fails. ``mnemos eval mqar --reach N`` splits at one distance; this splits at many, on the task each
checkpoint was trained on (its saved ``task``), with the held-out seed of the recall study.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/recall_by_distance.py \
        --model results/study-recall/runs/NAME/checkpoint [...] --samples 2000

Per checkpoint it prints, per distance bin (distance = query position - key position: 1 for a query right after
its pair's value), the queries counted, their accuracy and its standard error, and chance / 1/K beside them. For a
memory with momentum it also prints ``1 - eta^d``: the share of a token's write that has landed in the memory d
tokens later if the write enters only through the momentum (S_t = eta S_(t-1) - theta u_t, M_t = M_(t-1) + S_t:
after d tokens M has received (1 - eta^d) / (1 - eta) of the step), with eta the first memory layer's mean
momentum gate over the run's last logged training steps (``mem.0.eta_mean`` in metrics.jsonl) -- a hypothesis to
hold the accuracies against, not a fit.

``--instant-writes`` tests that hypothesis by intervention: a copy of each model whose memories write with eta = 0
and theta / (1 - eta) in place of (theta, eta), token by token, so every write lands at once with the weight the
momentum would have given it in the end (a diagnostic: the copy is never saved). If the near queries recover and the
far ones hold, the delay of the momentum is what costs the near queries.

``--gates`` prints, for a DeltaNet or Gated DeltaNet checkpoint, what its gates did on the same sequences, per layer
and head: the mean write strength beta, and for Gated DeltaNet the mean decay a and the retention over the whole
sequence, ``exp(sum_t log a_t)`` averaged over the sequences (the share of the first token's write left at the end
by the decay alone): whether a failure is forgetting or weak writing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import pairwise
from pathlib import Path

import torch

try:
    import mnemos  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnemos.data import MQARConfig
from mnemos.data.mqar import IGNORE_INDEX
from mnemos.eval.adapters import MnemosLMAdapter, load_mnemos_checkpoint
from mnemos.eval.tasks.mqar import saved_mqar_task
from mnemos.layers import NeuralMemory
from mnemos.models.baselines import LinearRecurrence

from forget_gate_probe import memory_copy  # noqa: E402  (benchmarks/ is on the path of a script run from it)

DEFAULT_EDGES = (1, 2, 3, 5, 9, 17, 33, 65, 129)  # bins [1, 2), [2, 3), [3, 5), ..., [129, L)


def query_distances(inputs: torch.Tensor, labels: torch.Tensor, num_kv_pairs: int):
    """For every query (label != IGNORE_INDEX): its row, position t and distance t - (key position), the key being
    the first of the row's K key slots (0, 2, ..., 2K - 2) holding the query token."""
    rows, t = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    keys = inputs[rows, 0 : 2 * num_kv_pairs : 2]  # [M, K]
    match = keys == inputs[rows, t].unsqueeze(1)
    if not bool(match.any(1).all()):
        raise ValueError("a query is none of its row's context keys: not MQAR data with this num_kv_pairs")
    slot = match.int().argmax(1)  # the first matching slot
    return rows, t, t - 2 * slot


def by_distance(hit: torch.Tensor, dist: torch.Tensor, edges) -> list[dict]:
    """Accuracy per bin [edges[i], edges[i + 1]) (the last bin open-ended), with counts and standard errors."""
    out = []
    bounds = list(edges) + [math.inf]
    for lo, hi in pairwise(bounds):
        sel = (dist >= lo) & (dist < hi)
        n = int(sel.sum())
        acc = float(hit[sel].float().mean()) if n else math.nan
        se = math.sqrt(acc * (1 - acc) / n) if n else math.nan
        out.append({"lo": lo, "hi": hi, "n": n, "accuracy": acc, "se": se})
    return out


def mean_eta(run_dir: Path, last: int = 10) -> float | None:
    """The first memory layer's mean momentum gate over the last ``last`` training lines that log it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train" and "mem.0.eta_mean" in rec:
            vals.append(rec["mem.0.eta_mean"])
    return sum(vals[-last:]) / len(vals[-last:]) if vals else None


def instant_writes(adapter: MnemosLMAdapter) -> MnemosLMAdapter:
    """A copy of the adapter whose memories write with (theta / (1 - eta), 0) instead of (theta, eta): no momentum,
    each write at its eventual weight at once."""
    model, memories = memory_copy(adapter, "writes to land")
    for m in memories:
        project = m._project

        def landed(x, conv_state, clock=None, project=project):
            q, k, v, theta, eta, alpha, conv, gate, clock = project(x, conv_state, clock)
            # (1 - eta) floored: an eta that rounds to 1 would give 0 / 0 (with ema_momentum theta carries the factor;
            # the gate as learned, before the momentum clock's scaling, whose eventual weight needs later gates)
            return q, k, v, theta / (1.0 - gate).clamp_min(1e-12), torch.zeros_like(eta), alpha, conv, gate, clock

        m._project = landed
    return MnemosLMAdapter(model, name=f"{adapter.name}, instant writes")


def delta_gates(model: torch.nn.Module, inputs: torch.Tensor, batch: int = 50) -> list[dict]:
    """Per delta-rule mixer (DeltaNet / Gated DeltaNet, in model order): per head the mean beta over every token of
    ``inputs``, and for Gated DeltaNet the mean decay a and the mean over sequences of ``exp(sum_t log a_t)`` (None
    for DeltaNet, whose state does not decay). Each mixer's gates are read off its own input (a forward hook on the
    model run as usual)."""
    mixers = [m for m in model.modules() if isinstance(m, LinearRecurrence) and m.kind != "linear_attention"]
    if not mixers:
        raise ValueError("no DeltaNet or Gated DeltaNet mixer in the model")
    sums = [{"beta": 0.0, "a": 0.0, "retention": 0.0, "tokens": 0, "rows": 0} for _ in mixers]

    def hook(i):
        def record(mod, args, _out):
            _, _, _, beta, a, _ = mod.features(args[0])  # [B, T, H] each
            s = sums[i]
            s["beta"] = s["beta"] + beta.sum((0, 1))
            s["tokens"] += beta.shape[0] * beta.shape[1]
            s["rows"] += beta.shape[0]
            if a is not None:
                s["a"] = s["a"] + a.sum((0, 1))
                s["retention"] = s["retention"] + a.log().sum(1).exp().sum(0)
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(mixers)]
    try:
        with torch.no_grad():
            for i in range(0, inputs.shape[0], batch):
                model(inputs[i : i + batch])
    finally:
        for h in handles:
            h.remove()
    out = []
    for m, s in zip(mixers, sums, strict=True):
        gated = m.kind == "gated_deltanet"
        out.append({"kind": m.kind, "beta": (s["beta"] / s["tokens"]).tolist(),
                    "a": (s["a"] / s["tokens"]).tolist() if gated else None,
                    "retention": (s["retention"] / s["rows"]).tolist() if gated else None})
    return out


def predictions(adapter, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    pred = torch.empty_like(inputs)
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            logits, _ = adapter.forward(inputs[i : i + batch], adapter.init_state(min(batch, inputs.shape[0] - i)))
            pred[i : i + batch] = logits.argmax(-1)
    return pred


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="checkpoint directories (RUN/checkpoint)")
    p.add_argument("--samples", type=int, default=2000, help="MQAR sequences per checkpoint (default 2000)")
    p.add_argument("--seed", type=int, default=7777, help="data seed (default 7777, the recall study's held-out one)")
    p.add_argument("--edges", type=int, nargs="+", default=list(DEFAULT_EDGES), help="bin lower edges (distances)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the bins as JSON here")
    p.add_argument("--instant-writes", action="store_true",
                   help="also each model with eta = 0 and theta / (1 - eta): its writes landed at once")
    p.add_argument("--gates", action="store_true",
                   help="also a delta rule's gates per layer and head: mean beta, mean decay a, retention over L")
    args = p.parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        p.error("--samples and --batch-size must be >= 1")
    if sorted(set(args.edges)) != args.edges or args.edges[0] < 1:
        p.error(f"--edges must be increasing distances >= 1, got {args.edges}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for spec in args.model:
        task = saved_mqar_task([spec])
        if not {"seq_len", "vocab_size", "num_kv_pairs"} <= set(task):
            p.error(f"{spec}: not an MQAR checkpoint with a saved task")
        cfg = MQARConfig(**task, num_examples=args.samples)
        inputs, labels = cfg.build(args.seed)
        base = load_mnemos_checkpoint(spec, device="cpu")
        variants = [("", base)]
        if args.instant_writes:
            if any(isinstance(m, NeuralMemory) for m in base.model.modules()):
                variants.append((" [instant writes]", instant_writes(base)))
            else:
                print(f"{spec}: no neural memory, no instant-writes copy")
        rows, t, dist = query_distances(inputs, labels, cfg.num_kv_pairs)
        eta = mean_eta(Path(spec).resolve().parent)
        K, V = cfg.num_kv_pairs, cfg.vocab_size
        for suffix, adapter in variants:
            pred = predictions(adapter, inputs, args.batch_size)
            hit = pred[rows, t] == labels[rows, t]
            bins = by_distance(hit, dist, args.edges)
            show_eta = eta is not None and not suffix
            print(f"\n{spec}{suffix}: L {cfg.seq_len}, K {K}, vocab {V}, noise {cfg.noise}, {args.samples} sequences, "
                  f"seed {args.seed}; all queries {float(hit.float().mean()):.4f} (n {hit.numel()}); chance "
                  f"{1 / (V - V // 2):.4f}, 1/K {1 / K:.4f}" + (f"; mem.0 eta (training mean) {eta:.3f}" if show_eta else ""))
            print("| distance | queries | accuracy | ± 1 SE |" + (" 1 - eta^d (d = bin's low edge) |" if show_eta else ""))
            print("|---|---|---|---|" + ("---|" if show_eta else ""))
            for b in bins:
                span = f"{b['lo']}" if b["hi"] == b["lo"] + 1 else \
                    f"{b['lo']}–{'' if b['hi'] == math.inf else b['hi'] - 1}"
                acc = "—" if b["n"] == 0 else f"{b['accuracy']:.3f}"
                se = "—" if b["n"] == 0 else f"{b['se']:.3f}"
                landed = f" {1 - eta ** b['lo']:.2f} |" if show_eta else ""
                print(f"| {span} | {b['n']} | {acc} | {se} |{landed}")
            results[spec + suffix] = {"task": task, "samples": args.samples, "seed": args.seed, "eta_mean": eta,
                                      "bins": bins, "accuracy": float(hit.float().mean()), "n": int(hit.numel())}
        if args.gates:
            if not any(isinstance(m, LinearRecurrence) and m.kind != "linear_attention" for m in base.model.modules()):
                print(f"{spec}: no DeltaNet or Gated DeltaNet mixer, no gates")
                continue
            gates = delta_gates(base.model, inputs, args.batch_size)
            fmt = lambda xs, f: " ".join(format(x, f) for x in xs)  # noqa: E731
            print(f"\n{spec}: gates on the same {args.samples} sequences, per head")
            print(f"| layer | mean beta | mean decay a | retention over {cfg.seq_len} tokens |\n|---|---|---|---|")
            for i, gt in enumerate(gates):
                a = "—" if gt["a"] is None else fmt(gt["a"], ".4f")
                ret = "— (no decay)" if gt["retention"] is None else fmt(gt["retention"], ".2e")
                print(f"| {i} | {fmt(gt['beta'], '.3f')} | {a} | {ret} |")
            results[spec]["gates"] = gates
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
