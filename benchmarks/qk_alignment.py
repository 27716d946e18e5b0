"""Which memory heads read MQAR pairs: for each query, does the queried pair's key score highest under the query?

For an MQAR pair (a, b) at positions p, p + 1 the memory write that can bind them is the one at p + 1 (its key from
the conv's previous-token tap, its value from b); a later query for a recalls b only if its query q matches that key
k_{p+1} better than the other pairs' keys k_{p'+1}. For every memory layer and head this prints the share of the
queries where it does (chance 1/K), from the layer's own q and k (``NeuralMemory._project``) on held-out MQAR
sequences, and the model's accuracy on them. A model that recalls has at least one head near 1.00 (docs/MODELS.md,
"How the memory learns to recall").

    PYTHONPATH=src python benchmarks/qk_alignment.py results/study-recall/runs/mqar-L64-K8-lmm-d2-lr0.003-s2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mnemos.checkpoint import load_model_weights
from mnemos.data.mqar import MQARConfig
from mnemos.layers.neural_memory import NeuralMemory
from mnemos.models import MnemosLM
from mnemos.train.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling diagnostics, when imported from elsewhere
from forget_gate_probe import traced_projections  # noqa: E402


def capture_qk(model: MnemosLM, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``model`` on ``x`` ``[B, T]``; returns its logits and each memory layer's ``(q, k)`` ``[B, T, H, D]``, in
    call order, aligned with x (an LMM's persistent tokens, written first, are cut off)."""
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not layers:
        raise ValueError("the model has no memory layer (NeuralMemory): nothing to measure")
    with traced_projections(layers) as seen, torch.no_grad():
        logits, _ = model(x)
    T = x.shape[1]
    caps = [(calls[0][0], calls[0][1]) for calls in seen if len(calls) == 1]
    if len(caps) != len(layers) or any(q.shape[1] < T for q, _ in caps):
        raise ValueError(f"the model's {len(layers)} memory layers were called {sum(map(len, seen))} times on pieces "
                         "of the sequence (MAC writes and reads per segment): this measures models whose memory reads "
                         "the whole sequence in one call (lmm, mag, mal and the Miras / Atlas memories)")
    return logits, [(q[:, q.shape[1] - T:], k[:, k.shape[1] - T:]) for q, k in caps]


def pair_key_ranks_first(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         num_kv_pairs: int) -> torch.Tensor:
    """Per head ``[H]``: the share of the scored queries (``y != -100``) whose pair's key ``k_{p+1}`` has the highest
    ``q . k`` among the K pairs' keys at their value positions (ties count as misses)."""
    K = num_kv_pairs
    value_pos = torch.arange(K) * 2 + 1
    hits = []
    for b in range(x.shape[0]):
        where = {int(x[b, 2 * i]): i for i in range(K)}
        for r in (y[b] != -100).nonzero().flatten().tolist():
            i = where[int(x[b, r])]
            scores = torch.einsum("hd,khd->kh", q[b, r], k[b, value_pos])  # [K, H]
            others = torch.cat([scores[:i], scores[i + 1:]])
            hits.append((scores[i][None] > others).all(0).float())
    return torch.stack(hits).mean(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (config.json and checkpoint/) of MQAR-trained models")
    ap.add_argument("--examples", type=int, default=128, help="held-out MQAR sequences (default %(default)s)")
    ap.add_argument("--seed", type=int, default=4242, help="their data seed (default %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for run in args.runs:
        cfg = TrainConfig.from_dict(json.loads((Path(run) / "config.json").read_text()))
        t = cfg.task
        if t.kind != "mqar":
            raise SystemExit(f"{run}: task.kind is {t.kind!r}; this measures MQAR-trained models")
        model = MnemosLM(cfg.model).eval()
        load_model_weights(Path(run) / "checkpoint", model)
        x, y = MQARConfig(seq_len=t.seq_len, num_kv_pairs=t.num_kv_pairs, vocab_size=cfg.model.vocab_size,
                          num_examples=args.examples).build(args.seed)
        try:
            logits, caps = capture_qk(model, x)
        except ValueError as e:
            raise SystemExit(f"{run}: {e}") from None
        acc = (logits.argmax(-1) == y)[y != -100].float().mean().item()
        print(f"{run}: accuracy {acc:.3f} on {args.examples} sequences; per head, the share of queries whose "
              f"pair's key scores highest (chance {1 / t.num_kv_pairs:.3f}):")
        for i, (q, k) in enumerate(caps):
            shares = pair_key_ranks_first(q, k, x, y, t.num_kv_pairs)
            print(f"  memory layer {i}: " + "  ".join(f"head {h} {v:.2f}" for h, v in enumerate(shares.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
