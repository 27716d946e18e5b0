"""The arithmetic floor of the memory rule's presets on this CPU (issue 14's speed targets): how fast each could run
if every FLOP it cannot avoid ran at the machine's own matmul rate, beside Titans' measured time, in one process.

Titans' chunked dual form never forms a token's memory inside a chunk: every read and write is a few matmuls at the
chunk's anchor (``flops.memory_rule_counts``). The dense retentions and Muon cannot avoid it:

- ``lq`` (Moneta): a token's read is ``F(A_t) x = ||A_t||_q^(2-q) A_t x``; the norm needs every entry of A_t, so every
  entry of every token's accumulator is formed (A_t = (1 - a) A_(t-1) + S_t and S_t = eta S_(t-1) - theta g k^T:
  counted as 2 FLOPs, the outer product's entry folded into an FMA), raised to the q-th power (2 FLOPs for q = 4) and
  summed (1): >= 5 FLOPs per state entry per token in the forward.
- ``kl`` (Memora): the softmax of every row of A_t: the same 2 to form it, an exp (counted as 1 FLOP: a lower
  bound), a sum and a scale: >= 5 per entry per token.
- ``muon`` (Atlas): Newton-Schulz on every token's S, ``ns_steps`` iterations on the m x n layer matrix (m <= n), at
  the cheaper of two exact forms: on X itself (X X^T, (X X^T)^2 and (.) X: 2 m^2 n + 2 m^3 + 2 m^2 n FLOPs a step), or
  in the m x m Gram domain: every iterate is X_k = P_k X_0 with P_k a polynomial in G = X_0 X_0^T, and all of them
  commute, so G_(k+1) = G_k p(G_k)^2 and P_(k+1) = p(G_k) P_k with p(g) = a + b g + c g^2 take four m x m products a
  step (8 m^3 FLOPs; cheaper than the first form when n > 1.5 m). The reads never need NS(S_t) itself (its product
  with a vector is P (S_t x) / ||S_t||), and G_t of S_t = e_t S_0 - (rank <= n tokens) follows from the chunk's
  S_0 S_0^T by low-rank updates, so neither is counted. Plus forming S_t and A_t (2 + 2 per entry) and the window's
  extra outer products (w - 1 per token, 2 FLOPs an entry). A third exact form (session 41, what mnemos runs on the
  CPU: ``memory_rule/muon_rowspace.py``): within a chunk of C tokens every S_t has its rows in one subspace of
  c = min(n, m + C + w - 1) dimensions (S_0's rows and the chunk's key-side vectors), so NS runs on each token's
  m x c coordinates (4 m^2 c + 2 m^3 a step) and only those are formed (>= 2 FLOPs an entry, against the 4 + 2 (w -
  1) per entry of S_t and A_t). The count takes the cheapest NS and, separately, the cheapest entry work: their sum is
  at most any one form's.

The backward costs at least what the forward does for the entrywise work (each entry's gradient goes back through
the same two recurrences and the power / exp) and twice the forward for Newton-Schulz's matmuls (each matmul's
backward is two of its size): fwd+bwd >= 2 x fwd (entrywise) and 3 x fwd (NS). Titans' own work is added to every
rule's (they keep the anchor's gradients and reads). The floor is then (FLOPs) / (this machine's single-thread
float32 matmul rate, measured on a 1024^3 product): no kernel on this core runs them faster, so a floor above a
target's multiple of Titans' *measured* time means the target cannot be met on this machine by an implementation
of the rule as specified that evaluates Newton-Schulz in one of these forms (no cheaper exact form is known to us).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/rule_floor.py --out benchmarks/results/rule_floor-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from flops import memory_rule_counts, memory_rule_layers
from memory_rules_speed import call, make_inputs
from speed_common import add_denormals_flag, cpu_model, git_commit, set_denormals

try:
    import mnemos  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnemos.ops import RULES

TARGETS = {"moneta": 1.5, "memora": 1.5, "atlas": 4.0}  # issue 14: chunked fwd+bwd <= this x Titans' time


def extra_flops(rule, layers, tokens: int, chunk: int | None = None) -> tuple[float, float]:
    """(fwd, fwd+bwd) FLOPs a rule needs beyond Titans' chunked form, summed over ``tokens`` (sequence, head, token)
    triples: the lower bounds of the module docstring (Muon's row-space form counted when ``chunk`` is given)."""
    fwd = fwdbwd = 0.0
    for d_in, d_out in layers:
        entries = d_in * d_out
        if rule.optimizer == "muon":
            m, n = min(d_in, d_out), max(d_in, d_out)
            forms = [4 * m * m * n + 2 * m ** 3, 8 * m ** 3]  # on X, in the Gram domain
            entry = 4 * entries + 2 * entries * (rule.window - 1)
            if chunk is not None:  # in the chunk's row space, on m x c coordinates
                c = min(n, m + chunk + rule.window - 1)
                forms.append(4 * m * m * c + 2 * m ** 3)
                entry = min(entry, 2 * m * c)
            ns = rule.ns_steps * min(forms)
            fwd += ns + entry
            fwdbwd += 3 * ns + 2 * entry
        elif rule.retention in ("lq", "kl"):
            fwd += 5 * entries
            fwdbwd += 10 * entries
    return fwd * tokens, fwdbwd * tokens


def matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """Single-thread float32 FLOP/s of an n^3 matmul (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def titans_fwdbwd_seconds(B: int, T: int, H: int, D: int, E: int, chunk: int, repeats: int) -> float:
    rule = RULES["titans"]
    inp = make_inputs(rule, B, T, H, D, E)

    def fwdbwd():
        call(rule, inp, chunk).sum().backward()

    fwdbwd()  # warm-up
    return statistics.median(_time(fwdbwd) for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="Titans fwd+bwd timings (median)")
    p.add_argument("--out", default=None)
    add_denormals_flag(p)  # as memory_rules_speed.py: Titans timed alike in both
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    set_denormals(a.denormals)
    B, T, H, D, E = a.batch, a.seq_len, a.heads, a.head_dim, a.expansion
    layers = memory_rule_layers(D, 2, E)
    titans = memory_rule_counts(B, T, H, layers, a.chunk, io_bytes=4)["fwdbwd"]["flops"]
    rate = matmul_rate()
    measured = titans_fwdbwd_seconds(B, T, H, D, E, a.chunk, a.repeats)
    rows = []
    for name in ("titans", *TARGETS):
        _, extra = extra_flops(RULES[name], layers, B * T * H, chunk=a.chunk)
        floor = (titans + extra) / rate
        rows.append({"rule": name, "fwdbwd_gflop": (titans + extra) / 1e9, "floor_s": floor,
                     "floor_x_titans": floor / measured, "target_x": TARGETS.get(name)})
    print(f"B {B}, T {T}, {H} heads x {D}, depth 2 (expansion {E}), chunk {a.chunk}; one thread; matmul rate "
          f"{rate / 1e9:.1f} GFLOP/s; Titans fwd+bwd measured {measured:.3f} s (median of {a.repeats})")
    print("| rule | fwd+bwd GFLOP (lower bound) | floor s at the matmul rate | floor / Titans measured | target | "
          "verdict |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        target, verdict = ("", "") if r["target_x"] is None else (f"<= {r['target_x']:g}x", (
            "cannot be met on this machine" if r["floor_x_titans"] > r["target_x"] else "not excluded by arithmetic"))
        print(f"| {r['rule']} | {r['fwdbwd_gflop']:.1f} | {r['floor_s']:.3f} | {r['floor_x_titans']:.2f}x | "
              f"{target} | {verdict} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"matmul_flops_per_s": rate, "titans_fwdbwd_s": measured, "rows": rows,
                                           "args": vars(a), "threads": torch.get_num_threads(), "cpu": cpu_model(),
                                           "torch": torch.__version__, "git": git_commit()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
