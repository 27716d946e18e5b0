"""How much of a memory model's long-context loss is its forgetting gate: a trained checkpoint on S-NIAH passkey
prompts as trained and with every memory's forgetting-gate bias lowered by each ``--shift`` (alpha = sigmoid(b +
w.x) about e^shift times smaller; ``memory.forget_bias`` sets b at initialisation, docs/MODELS.md). A diagnostic, not
a model: the shifted copies are never saved. If long contexts recover with the decay gone, the decay limited them;
what is still lost with a large shift is the rest (the haystack's own writes).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/forget_gate_probe.py --model RUN/checkpoint \
        --shifts 5 10 --lengths 512 1024 4096 16384 --samples 3 --out /tmp/forget-probe

Prints the table of ``mnemos eval niah`` (accuracy by length, and by depth and length) and writes its
``results.json`` / ``report.md`` to ``--out``; each model's name says its shift. Chance for a 5-digit key: 1e-5.

``--task mqar`` asks the same of MQAR length extrapolation (a model trained at a short L, evaluated at longer ones
with K fixed): ``--kv-pairs`` K, ``--vocab`` the model's vocabulary, ``--samples`` sequences a length; the noise is
``disjoint`` (it never repeats a key, as the recall study's extrapolation evals), so a lost pair is the memory's doing.
``--stop-writes`` adds a copy that writes its memories with the K pairs only (theta = 0 after them), to measure what
the later tokens' writes cost:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/forget_gate_probe.py --task mqar --model RUN/checkpoint \
        --shifts 10 --stop-writes --lengths 64 256 1024 --kv-pairs 8 --vocab 128 --samples 1000
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

try:
    import mnemos  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnemos.data import MQARConfig
from mnemos.data.niah import NIAHConfig
from mnemos.eval.adapters import MnemosLMAdapter, load_mnemos_checkpoint
from mnemos.eval.harness import evaluate
from mnemos.eval.report import write_report
from mnemos.eval.runner import EvalOptions
from mnemos.layers import NeuralMemory


def shifted(adapter: MnemosLMAdapter, shift: float) -> MnemosLMAdapter:
    """A copy of the adapter's model with every NeuralMemory's forgetting-gate bias lowered by ``shift``."""
    model = copy.deepcopy(adapter.model)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError(f"{adapter.name} has no neural memory (a forgetting gate to shift)")
    with torch.no_grad():
        for m in memories:
            m.forget_gate_bias.sub_(shift)
    return MnemosLMAdapter(model, name=f"{adapter.name}, forget bias -{shift:g}")


def writes_stopped(adapter: MnemosLMAdapter, after: int) -> MnemosLMAdapter:
    """A copy of the adapter's model whose memories write only the first ``after`` tokens of each call (theta = 0 from
    there on: the memory is read, never written, after them). For whole-sequence calls of a model whose memory sees
    the tokens alone (lmm's persistent prefix counts: pass ``after`` including it); MQAR at L <= ``--stream-chunk``
    is one call. If accuracy at long L comes back with the later writes gone, those writes are what lost the pairs."""
    model = copy.deepcopy(adapter.model)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError(f"{adapter.name} has no neural memory (writes to stop)")
    for m in memories:
        project = m._project

        def stopped(x, conv_state, project=project):
            q, k, v, theta, eta, alpha, conv = project(x, conv_state)
            theta = theta.clone()
            theta[:, after:] = 0.0
            return q, k, v, theta, eta, alpha, conv

        m._project = stopped
    return MnemosLMAdapter(model, name=f"{adapter.name}, writes stop after {after} tokens")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a mnemos checkpoint directory of a memory model")
    p.add_argument("--task", choices=["passkey", "mqar"], default="passkey")
    p.add_argument("--shifts", type=float, nargs="+", default=[5.0, 10.0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 4096, 16384])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, default=3, help="prompts per (length, depth); mqar: sequences per length")
    p.add_argument("--kv-pairs", type=int, default=8, help="mqar: key-value pairs per sequence")
    p.add_argument("--vocab", type=int, default=128, help="mqar: the model's vocabulary (keys and values drawn in it)")
    p.add_argument("--stop-writes", action="store_true", help="mqar: also a copy whose memories stop writing after "
                   "the K pairs (and the persistent prefix): the writes after the pairs, measured")
    p.add_argument("--reach", type=int, default=14, help="mqar: where accuracy splits near / far (the recall study's "
                   "n_layers * (window - 1))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for results.json and report.md (default: none)")
    args = p.parse_args(argv)
    if any(not s > 0 for s in args.shifts):
        p.error(f"--shifts must be > 0, got {args.shifts}")
    torch.set_num_threads(args.threads)
    base = load_mnemos_checkpoint(args.model, device="cpu")
    models = [base] + [shifted(base, s) for s in args.shifts]
    if args.stop_writes:
        if args.task != "mqar":
            p.error("--stop-writes is an MQAR probe (--task mqar)")
        models.append(writes_stopped(base, base.model.config.num_persistent + 2 * args.kv_pairs))
    if args.task == "passkey":
        tasks = [NIAHConfig(kind="passkey", lengths=tuple(args.lengths), depths=tuple(args.depths),
                            samples_per_cell=args.samples)]
    else:
        tasks = [MQARConfig(vocab_size=args.vocab, seq_len=n, num_kv_pairs=args.kv_pairs, num_examples=args.samples,
                            noise="disjoint") for n in args.lengths]
    options = EvalOptions(stream_chunk=args.stream_chunk, progress=False, keep_samples=False, mqar_reach=args.reach)
    results = evaluate(models, tasks, seed=args.seed, options=options)
    if args.out:
        write_report(results, args.out, plots=False)
        print((Path(args.out) / "report.md").read_text())
    else:
        for c in results.cells:
            print(c.model["name"], c.params, f"{c.metrics.get('accuracy', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
