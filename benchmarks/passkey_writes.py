"""Where a memory model writes and forgets on S-NIAH passkey prompts: for each memory layer, the (token, head) pairs
with a write (theta > 0) in the needle and in the rest of the prompt (instruction, haystack, question), and each
head's mean forgetting rate alpha after the needle. A diagnostic of the write policy a model learnt (docs/RESULTS.md,
"Gate floors"): with sigmoid gates every pair writes a little; with gate floors (``memory.write_floor``) a pair may
write exactly nothing, and a model whose haystack pairs all stay at 0 and whose key-holding heads have alpha = 0
holds the key however long the haystack.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/passkey_writes.py --model RUN/checkpoint --length 4096 \
        --depths 0.1 0.5 0.9 --seed 7777

Prints one line per prompt and layer, then the totals; ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:
    import mnemos  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnemos.data.niah import NIAHConfig
from mnemos.eval.adapters import load_mnemos_checkpoint
from mnemos.layers import NeuralMemory

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling diagnostics, when imported from elsewhere
from forget_gate_probe import traced_projections  # noqa: E402


def gate_traces(adapter, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``input_ids [1, T]`` through the model from a fresh state; per memory layer (in module order) the write
    strength theta / its bound and the forgetting rate alpha of every prompt token, each ``[T, H]``. The model is
    not changed (the layers' ``_project`` is traced for the call only: ``forget_gate_probe.traced_projections``)."""
    memories = [m for m in adapter.model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError(f"{adapter.name} has no neural memory: nothing writes")
    with traced_projections(memories) as seen, torch.no_grad():
        adapter.forward(input_ids, adapter.init_state(1))
    T = input_ids.shape[1]  # what a model writes in init_state (lmm's persistent prefix) comes first: drop it
    return [(torch.cat([c[3][0] for c in calls])[-T:] / m.token_lr, torch.cat([c[5][0] for c in calls])[-T:])
            for m, calls in zip(memories, seen, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a mnemos checkpoint directory of a memory model")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--seed", type=int, default=7777)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the per-prompt rows and totals here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapter = load_mnemos_checkpoint(args.model, device="cpu")
    rows, totals = [], {}
    for depth in args.depths:
        s = NIAHConfig(kind="passkey", lengths=(args.length,), depths=(depth,), samples_per_cell=1).build(args.seed)[0]
        ids = s.input_ids.unsqueeze(0)
        start, end = s.needle_start, s.needle_start + len(s.needle.encode())
        for layer, (theta, alpha) in enumerate(gate_traces(adapter, ids)):
            rest = torch.cat([theta[:start], theta[end:]])
            after = theta[end:] > 0  # writes after the needle: the ones that can change where its key is kept
            row = {"depth": depth, "layer": layer, "needle_pairs": theta[start:end].numel(),
                   "needle_written": int((theta[start:end] > 0).sum()), "rest_pairs": rest.numel(),
                   "rest_written": int((rest > 0).sum()), "after_needle_written": int(after.sum()),
                   "after_needle_written_per_head": after.sum(0).tolist(),
                   "alpha_after_needle_per_head": alpha[end:].mean(0).tolist()}
            rows.append(row)
            t = totals.setdefault(layer, {"rest_pairs": 0, "rest_written": 0, "needle_pairs": 0, "needle_written": 0})
            for k in t:
                t[k] += row[k]
            alphas = " / ".join(f"{a:.2g}" for a in row["alpha_after_needle_per_head"])
            print(f"depth {depth} layer {layer}: needle pairs written {row['needle_written']} of "
                  f"{row['needle_pairs']}, the rest of the prompt {row['rest_written']} of {row['rest_pairs']} "
                  f"({row['after_needle_written']} after the needle; by head "
                  f"{' / '.join(str(n) for n in row['after_needle_written_per_head'])}); "
                  f"alpha after the needle by head {alphas}", flush=True)
    for layer, t in totals.items():
        print(f"layer {layer}: written {t['needle_written']} of {t['needle_pairs']} needle (token, head) pairs, "
              f"{t['rest_written']} of {t['rest_pairs']} elsewhere")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "length": args.length, "seed": args.seed,
                                               "rows": rows, "totals": totals}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
