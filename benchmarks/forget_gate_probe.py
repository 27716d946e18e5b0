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
the later tokens' writes cost (with ``--task passkey``: written up to the end of each prompt's needle, with and
without each shift, streamed one prompt at a time; printed before the harness's tables):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/forget_gate_probe.py --task mqar --model RUN/checkpoint \
        --shifts 10 --stop-writes --lengths 64 256 1024 --kv-pairs 8 --vocab 128 --samples 1000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator, Sequence
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


def memory_copy(adapter: MnemosLMAdapter, purpose: str) -> tuple[torch.nn.Module, list[NeuralMemory]]:
    """A deep copy of the adapter's model and its NeuralMemory layers, for a diagnostic to alter (the adapter's own
    model is never touched); ValueError naming ``purpose`` when the model has no neural memory."""
    model = copy.deepcopy(adapter.model)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError(f"{adapter.name} has no neural memory ({purpose})")
    return model, memories


@contextlib.contextmanager
def traced_projections(memories: Sequence[NeuralMemory]) -> Iterator[list[list[tuple[torch.Tensor, ...]]]]:
    """While open, each layer's ``_project`` outputs ``(q, k, v, theta, eta, alpha)``, detached, are appended to its
    own list, one entry per call (layers in the order given). On exit every layer has back what it had: its class's
    method, or the wrapper another diagnostic put on it. The diagnostics that read gates or keys share this."""
    seen: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in memories]
    own = [vars(m).get("_project") for m in memories]
    try:
        for m, calls in zip(memories, seen, strict=True):
            def traced(x, conv_state, clock=None, project=m._project, calls=calls):
                out = project(x, conv_state, clock)
                calls.append(tuple(t.detach() for t in out[:6]))
                return out
            m._project = traced
        yield seen
    finally:
        for m, project in zip(memories, own, strict=True):
            if project is None:
                vars(m).pop("_project", None)
            else:
                m._project = project


def shifted(adapter: MnemosLMAdapter, shift: float) -> MnemosLMAdapter:
    """A copy of the adapter's model with every NeuralMemory's forgetting-gate bias lowered by ``shift``."""
    model, memories = memory_copy(adapter, "a forgetting gate to shift")
    with torch.no_grad():
        for m in memories:
            m.forget_gate_bias.sub_(shift)
    return MnemosLMAdapter(model, name=f"{adapter.name}, forget bias -{shift:g}")


def writes_stopped(adapter: MnemosLMAdapter, after: int | None) -> MnemosLMAdapter:
    """A copy of the adapter whose memories write only the first ``after`` tokens of each sequence (theta = 0 from
    there on: the memory is read, never written, after them; None: never stopped). Tokens are counted per memory
    from each ``init_state`` (what a model writes there, lmm's persistent prefix, is not counted), over every call of
    the stream. ``after`` may be set per prompt with :func:`set_stop`. If accuracy at long contexts comes back
    with the later writes gone, those writes are what lost the stored items."""
    model, memories = memory_copy(adapter, "writes to stop")
    for m in memories:
        project = m._project
        m._writes = {"after": after, "seen": 0, "prefix": 0}

        def stopped(x, conv_state, clock=None, project=project, w=m._writes):
            q, k, v, theta, eta, alpha, *rest = project(x, conv_state, clock)
            start, w["seen"] = w["seen"], w["seen"] + x.shape[1]
            stop = None if w["after"] is None else w["prefix"] + w["after"]
            if stop is not None and stop - start < x.shape[1]:
                theta = theta.clone()
                theta[:, max(0, stop - start):] = 0.0
            return (q, k, v, theta, eta, alpha, *rest)

        m._project = stopped
    probe = MnemosLMAdapter(model, name=f"{adapter.name}, writes stop" + ("" if after is None else f" after {after}"))
    init_state = probe.init_state

    def counted_init_state(batch: int):
        for m in memories:
            m._writes["seen"] = 0
        state = init_state(batch)
        for m in memories:  # the prefix the model wrote while making the state
            m._writes["prefix"] = m._writes["seen"]
        return state

    probe.init_state = counted_init_state
    return probe


def set_stop(adapter: MnemosLMAdapter, after: int | None) -> None:
    """Set a :func:`writes_stopped` copy's stop for the streams it starts from now on (None: never)."""
    for m in adapter.model.modules():
        if isinstance(m, NeuralMemory):
            m._writes["after"] = after


def passkey_with_writes_stopped(adapter: MnemosLMAdapter, samples, stream_chunk: int) -> float:
    """Exact-match accuracy of a :func:`writes_stopped` copy on S-NIAH prompts, each streamed alone (batch 1) with
    the memories written up to the end of its needle (and the persistent prefix) only, then greedy answers."""
    from mnemos.data import ByteTokenizer, exact_match

    tok, right = ByteTokenizer(), 0
    with torch.no_grad():
        for s in samples:
            set_stop(adapter, s.needle_start + len(s.needle.encode()))
            state = adapter.init_state(1)
            ids = s.input_ids.unsqueeze(0)
            for i in range(0, ids.shape[1], stream_chunk):
                logits, state = adapter.forward(ids[:, i:i + stream_chunk], state)
            out = []
            for _ in range(len(s.answer) + 2):  # the answer and what closes it (" 71432.")
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
                logits, state = adapter.forward(nxt, state)
            right += exact_match(tok.decode(out), s.answer)
    return right / len(samples)


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
    p.add_argument("--stop-writes", action="store_true", help="also copies whose memories stop writing after the K "
                   "pairs (mqar) or after each prompt's needle (passkey; streamed one prompt at a time, with and "
                   "without each shift): what the later tokens' writes cost")
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
    if args.stop_writes and args.task == "mqar":
        probe = writes_stopped(base, 2 * args.kv_pairs)
        probe.name = f"{base.name}, writes stop after the {args.kv_pairs} pairs"
        models.append(probe)
    if args.task == "passkey":
        tasks = [NIAHConfig(kind="passkey", lengths=tuple(args.lengths), depths=tuple(args.depths),
                            samples_per_cell=args.samples)]
    else:
        tasks = [MQARConfig(vocab_size=args.vocab, seq_len=n, num_kv_pairs=args.kv_pairs, num_examples=args.samples,
                            noise="disjoint") for n in args.lengths]
    options = EvalOptions(stream_chunk=args.stream_chunk, progress=False, keep_samples=False, mqar_reach=args.reach)
    results = evaluate(models, tasks, seed=args.seed, options=options)
    if args.stop_writes and args.task == "passkey":  # each prompt its own stop: streamed here, not by the harness
        print("passkey, memories written up to the end of the needle only (exact match; by length, then depth):")
        for name, probe in [("", writes_stopped(base, None))] + [
                (f", forget bias -{sh:g}", writes_stopped(shifted(base, sh), None)) for sh in args.shifts]:
            for length in args.lengths:
                accs = [passkey_with_writes_stopped(probe, NIAHConfig(
                    kind="passkey", lengths=(length,), depths=(d,), samples_per_cell=args.samples).build(args.seed),
                    args.stream_chunk) for d in args.depths]
                print(f"  writes stop after the needle{name}: length {length}: {sum(accs) / len(accs):.2f} "
                      f"(by depth {' / '.join(f'{a:.2f}' for a in accs)})", flush=True)
    if args.out:
        write_report(results, args.out, plots=False)
        print((Path(args.out) / "report.md").read_text())
    else:
        for c in results.cells:
            print(c.model["name"], c.params, f"{c.metrics.get('accuracy', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
