"""Wall time of the memory rule's presets on the chunked torch path beside Titans, one process (issue 14, section 2).

Rows: every preset of ``mnemos.ops.RULES`` that the chunked torch path covers (``--rules`` picks; default every
preset, uncovered ones are listed as "reference only" and not timed: the token-by-token reference is not a speed
path), plus ``lp-decay`` (Moneta's loss, p = 3, with Titans' retention), to separate a loss's cost from a retention's,
and, when named, ``atlas-formed`` / ``atlas-rowspace``: Atlas on one path whatever the device (every token's momentum
formed; NS in the chunk's row space, which ``atlas`` itself takes on the CPU only).
Inputs are built directly at [B, T, H, D] like benchmarks/op_speed.py (no projections, conv or norm): q, k
l2-normalised, v randn, theta = 0.01 sigmoid(randn), eta = sigmoid(randn), alpha = sigmoid(randn - 4), a depth-2 memory
(expansion 4, residual) of 0.02 randn weights shared by the batch, delta = 1 + softplus(randn) for huber and gamma =
sigmoid(randn) for a window; everything requires grad and "fwd+bwd" backpropagates (o * g).sum() into all of it.

A row may also be a preset with some axes changed, ``preset:axis=value,axis=value`` (values are YAML):
``atlas:ns_steps=1,window=1`` is Atlas with one NS step and no window; the axes are MemoryRule's fields.

Method: one thread, subnormal floats flushed to zero (``--denormals keep``: not; speed_common.DENORMALS_HELP says
why); every row is warmed up once at T = 2C; then --repeats rounds, each timing every row's fwd (with
autograd recording) and then every row's fwd+bwd, interleaved so that a busy machine slows every row alike; the
median is reported with the ratio to Titans.

Usage (the CPU shape of issue 14: B 2, T 2048, dim 256 = 4 heads x 64, depth 2, chunk 16):
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_rules_speed.py --rules
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_rules_speed.py --rules titans yaad --seq-len 512
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_rules_speed.py --rules titans moneta memora --state-reads
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_rules_speed.py --rules titans atlas-formed atlas
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory_rules_speed.py --rules atlas atlas:ns_steps=1,window=1
    PYTHONPATH=src python benchmarks/memory_rules_speed.py --device cuda --rules titans atlas-formed atlas-rowspace
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import mnemos  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnemos.ops import RULES, MemoryRule, neural_memory
from speed_common import add_denormals_flag, cpu_model, git_commit, set_denormals
from mnemos.ops.memory_rule import dense_scan
from mnemos.layers.neural_memory import MemorySettings
from mnemos.models.config import read_yaml
from mnemos.ops.memory_rule.rule import torch_unsupported_reason

EXTRA = {"lp-decay": MemoryRule(loss="lp", p=3.0)}
# Atlas on one path whatever the device: "formed" forms every token's momentum (the CPU path before session 41, the
# GPU's today), "rowspace" runs NS in the chunk's row space (the CPU's since session 41; memory_rule/muon_rowspace.py)
PATHS = {"atlas-formed": ("atlas", ()), "atlas-rowspace": ("atlas", ("cpu", "cuda"))}


@contextlib.contextmanager
def atlas_path(name: str):
    """Within: the row-space path taken on the devices of ``PATHS[name]`` (none: never); a name not in PATHS changes
    nothing."""
    if name not in PATHS:
        yield
        return
    devices = PATHS[name][1]
    real = dense_scan.rowspace_pays
    dense_scan.rowspace_pays = lambda S, n_keys: real(S, n_keys, devices=devices)
    try:
        yield
    finally:
        dense_scan.rowspace_pays = real


def row_rule(name: str) -> MemoryRule:
    """A row's name -> its rule: a preset, a name of EXTRA, a name of PATHS (Atlas on one path), or
    ``preset:axis=value,...`` (a preset with those MemoryRule fields replaced, values read as YAML). Anything else is
    a ValueError naming the row and what is accepted."""
    base, _, changes = name.partition(":")
    known = {**RULES, **EXTRA, **{n: RULES[p[0]] for n, p in PATHS.items()}}
    if base not in known or (":" in name and base not in RULES):
        raise ValueError(f"--rules: unknown row {name!r}; expected one of {sorted(known)} or "
                         f"preset:axis=value,... with a preset of {sorted(RULES)}")
    if ":" not in name:
        return known[base]
    fields = {f.name for f in dataclasses.fields(MemoryRule)}
    axes = {}
    for item in changes.split(","):
        key, eq, raw = item.partition("=")
        if not eq or key.strip() not in fields:
            raise ValueError(f"--rules: {name!r}: each change must be axis=value with an axis of {sorted(fields)}, "
                             f"got {item!r}")
        axes[key.strip()] = read_yaml(raw)
    try:  # the layer's own "preset plus axes" (memory.rule=atlas memory.ns_steps=1), with its range checks
        return MemorySettings(rule=base, **axes).memory_rule
    except (TypeError, ValueError) as e:
        raise ValueError(f"--rules: {name!r}: {e}") from None


def make_inputs(rule: MemoryRule, B: int, T: int, H: int, D: int, E: int, seed: int = 0, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(q=F.normalize(r(B, T, H, D), dim=-1), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
               theta=0.01 * torch.sigmoid(r(B, T, H)), eta=torch.sigmoid(r(B, T, H)),
               alpha=torch.sigmoid(r(B, T, H) - 4), weights=(0.02 * r(H, E * D, D), 0.02 * r(H, D, E * D)))
    if rule.loss == "huber":
        inp["delta"] = 1.0 + F.softplus(r(B, T, H))
    if rule.window > 1:
        inp["gamma"] = torch.sigmoid(r(B, T, H))
    return {n: tuple(t.to(device).requires_grad_() for t in x) if isinstance(x, tuple) else
            x.to(device).requires_grad_() for n, x in inp.items()}


def call(rule: MemoryRule, inp: dict, chunk: int, T: int | None = None):
    x = {n: (t if isinstance(t, tuple) else t[:, :T]) for n, t in inp.items()}
    args = [x.pop(n) for n in ("q", "k", "v", "theta", "eta", "alpha", "weights")]
    return neural_memory(*args, rule=rule, chunk_size=chunk, impl="torch", **x)[0]


def timed(fn, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_state_reads(a) -> list[dict]:
    """cpu_scan.lq4_norms and kl_row_read alone: one chunk (n = --chunk tokens, window 1) of every (sequence, head) row
    at each layer's [D_out, D_in] of the depth-2 memory; median of 20 calls after one, fwd and fwd+bwd."""
    from mnemos.ops.memory_rule import cpu_scan

    D, E, n = a.dim // a.heads, a.expansion, a.chunk
    g = torch.Generator().manual_seed(0)
    print(f"cpu_scan's per-token reads alone, one chunk of {n} tokens, {a.batch} x {a.heads} rows, window 1")
    rows = []
    for name, fn in (("lq4_norms", cpu_scan.lq4_norms), ("kl_row_read", cpu_scan.kl_row_read)):
        for P, Q in ((E * D, D), (D, E * D)):
            xs = [torch.randn(a.batch, a.heads, *s, generator=g) for s in ((P, Q), (P, Q), (n, P), (n, Q))]
            xs += [torch.rand(a.batch, a.heads, *s, generator=g) for s in ((n,), (n,), (n, 1))]
            if name == "kl_row_read":
                xs.append(torch.randn(a.batch, a.heads, n, Q, generator=g))
            xs = [x.requires_grad_() for x in xs]
            out = fn(*xs)
            grad = torch.ones_like(out)
            fwd = lambda: fn(*xs)  # noqa: E731
            both = lambda: torch.autograd.grad(fn(*xs), xs, grad)  # noqa: E731
            times = []
            for f in (fwd, both):
                f()
                times.append(statistics.median(timed(f) for _ in range(20)))
            print(f"  {name:<12} [{P:>4}, {Q:>4}]  fwd {times[0] * 1e3:6.2f} ms   fwd+bwd {times[1] * 1e3:6.2f} ms")
            rows.append(dict(kernel=name, shape=[P, Q], fwd_s=times[0], fwdbwd_s=times[1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="*", default=None,
                   help="presets (and lp-decay, atlas-formed, atlas-rowspace, or preset:axis=value,...) to time "
                        "beside titans; bare --rules or none given: every preset and lp-decay")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the CPU's thread count still applies)")
    p.add_argument("--out", default=None, help="JSON file to write (default: none)")
    p.add_argument("--state-reads", action="store_true",
                   help="also time cpu_scan's per-token reads alone (Moneta's norms, Memora's softmax read) on one "
                        "chunk of each layer's shape, beside the rules' rows")
    add_denormals_flag(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    flushed = set_denormals(a.denormals)
    reads = time_state_reads(a) if a.state_reads else []
    names = list(a.rules) if a.rules else [*RULES, *EXTRA]
    names = ["titans"] + [n for n in names if n != "titans"]
    try:
        rules = {n: row_rule(n) for n in names}
    except ValueError as e:
        p.error(str(e))
    B, T, H = a.batch, a.seq_len, a.heads
    D = a.dim // H
    rows, skipped = {}, {}
    for n, rule in rules.items():
        reason = torch_unsupported_reason(rule)
        if reason is not None:
            skipped[n] = "reference only: " + reason
            continue
        inp = make_inputs(rule, B, T, H, D, a.expansion, device=a.device)
        grad = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1)).to(a.device)
        with atlas_path(n):
            call(rule, inp, a.chunk, 2 * a.chunk).sum().backward()  # warm-up
        rows[n] = dict(rule=rule, inp=inp, grad=grad, fwd=[], fwdbwd=[])
    for _ in range(a.repeats):
        for n, r in rows.items():
            with atlas_path(n):
                r["fwd"].append(timed(lambda: call(r["rule"], r["inp"], a.chunk), a.device))
        for n, r in rows.items():
            with atlas_path(n):
                r["fwdbwd"].append(timed(lambda: call(r["rule"], r["inp"], a.chunk).backward(r["grad"]), a.device))
    base = {ph: statistics.median(rows["titans"][ph]) for ph in ("fwd", "fwdbwd")}
    print(f"memory rules, chunked torch path on {a.device}: B {B}, T {T}, dim {a.dim} ({H} heads x {D}), depth 2 (expansion "
          f"{a.expansion}), chunk {a.chunk}, {a.threads} thread(s), float32, median of {a.repeats}, subnormal floats "
          f"{'flushed to zero' if flushed else 'kept'} (--denormals)")
    w = max(18, *(len(n) + 2 for n in rules))
    print(f"{'rule':<{w}}{'fwd s':>9}{'x titans':>10}{'fwd+bwd s':>11}{'x titans':>10}  axes")
    out = []
    for n, r in rows.items():
        f, fb = statistics.median(r["fwd"]), statistics.median(r["fwdbwd"])
        axes = ", ".join(f"{k}={v!r}" for k, v in vars(r["rule"]).items() if getattr(MemoryRule(), k) != v) or "-"
        print(f"{n:<{w}}{f:>9.3f}{f / base['fwd']:>10.2f}{fb:>11.3f}{fb / base['fwdbwd']:>10.2f}  {axes}")
        out.append(dict(rule=n, axes=axes, fwd_s=f, fwdbwd_s=fb, fwd_ratio=f / base["fwd"],
                        fwdbwd_ratio=fb / base["fwdbwd"], fwd_all=r["fwd"], fwdbwd_all=r["fwdbwd"]))
    for n, why in skipped.items():
        print(f"{n:<{w}}  not timed ({why[:110]}...)")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=out, skipped=skipped, state_reads=reads,
                                               torch=torch.__version__, threads=torch.get_num_threads(),
                                               denormals_flushed=flushed,
                                               cpu=cpu_model(), git=git_commit()), indent=1))


if __name__ == "__main__":
    main()
