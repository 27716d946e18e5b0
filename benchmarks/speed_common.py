"""What layer_speed.py and op_speed.py share: the shape, a row's registry entry, one timed call, the CPU peak-memory
probe, the environment record, the command-line flags, and the run itself (warm-up, shortening T, interleaved timed
repeats, peak memory, ratios against a reference row, the table and the JSON).

A script describes its rows in a :class:`Bench` (rows, reference rows, table columns, what it records and prints
besides) and calls :func:`main`. Method (both scripts): every row is built and warmed up first. One untimed fwd+bwd
call at T = 2C pays one-time costs; the first full-size call (fwd+bwd) is the sanity check: output shape, finite
output, finite input gradient. If that call and one retry both take longer than --max-call-s, the row is measured at
half the sequence length (repeatedly, until it fits): the table says so, and the reference row is measured at that T
for the ratios. Then the timed calls are interleaved across rows (fwd for every row, then fwd+bwd for every row,
--repeats times), so that a busy machine slows every row alike, and the median is reported. "fwd" runs with autograd
recording (a training forward); "fwd+bwd" adds ``y.backward(g)`` with a fixed random g. On CUDA every timing is
bracketed by torch.cuda.synchronize().

Peak memory is the extra memory above the resident model and inputs:
    cuda: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the call, max over the repeats;
    cpu:  torch's CPU allocations are invisible to tracemalloc, so each (row, phase) runs once in a fresh subprocess
          (the script itself, with --_probe). It makes one short warm-up call, builds the model and input, resets
          the kernel's RSS high-water mark (/proc/self/clear_refs, Linux) and reports VmHWM - VmRSS after one call
          (getrusage ru_maxrss deltas where procfs is unavailable). This counts every page the call touches,
          allocator slack included: an upper-bound style measure, comparable between rows measured the same way,
          not the bytes torch asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import flops  # benchmarks/flops.py (this directory): the ceilings' FLOP and byte counts

REPO = Path(__file__).resolve().parents[1]

try:
    import mnemos
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))
    import mnemos


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and defaults


@dataclass(frozen=True)
class Shape:
    batch: int  # B
    seq_len: int  # T
    dim: int  # model width
    heads: int  # H
    head_dim: int  # D
    depth: int  # L, memory MLP depth
    expansion: int  # E, hidden width E * D
    chunk_size: int  # C, tokens per gradient anchor


SHAPES = {
    "cpu": Shape(batch=2, seq_len=2048, dim=256, heads=4, head_dim=64, depth=2, expansion=4, chunk_size=16),
    "cuda": Shape(batch=4, seq_len=4096, dim=512, heads=8, head_dim=64, depth=2, expansion=4, chunk_size=16),
}
# warmup/repeats as asked for; max_call_s: a row whose single fwd+bwd call takes longer is measured at a shorter T.
RUN_DEFAULTS = {
    "cpu": dict(warmup=1, repeats=3, max_call_s=120.0),
    "cuda": dict(warmup=3, repeats=10, max_call_s=30.0),
}


# ----------------------------------------------------------------------------------------------------------------------
# A row: builds a module (and the constructor arguments, for the record), makes its inputs and calls it


def available(device: torch.device, args: argparse.Namespace) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    name: str
    semantics: str  # layer rows: which gradient anchor; op rows: what the row computes
    build: Callable[[Shape, argparse.Namespace], tuple[nn.Module, dict]]
    call: Callable[..., Tensor]  # (module, *inputs) -> output
    inputs: Callable[[Shape, argparse.Namespace, torch.device], tuple[Tensor, ...]]  # leaves, requiring grad
    out_shape: Callable[[Shape], tuple[int, ...]]
    unavailable: Callable[[torch.device, argparse.Namespace], str | None] = available  # a reason to skip the row
    counts: Callable[[Shape, argparse.Namespace], dict] | None = None  # analytic FLOPs and bytes (benchmarks/flops.py)
    optional: bool = False  # an exception from it marks the row unavailable: expected, not a failure of the run


def triton_unavailable(device: torch.device, args: argparse.Namespace) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need CUDA; on CPU they run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow)"
    return None


@dataclass
class Bench:
    """What a script measures and how it reports it; :func:`main` does the rest."""

    name: str  # the JSON's "benchmark" and its default file name, benchmarks/results/<name>-<device>.json
    description: str  # the command line's description
    script: Path  # the script itself: the CPU memory probes run it again with --_probe
    impls: dict[str, Impl]
    default_rows: list[str]
    references: tuple[str, ...]  # ratios are taken against the first of these that was measured
    autocast: bool  # rows run under torch.autocast at --dtype bfloat16 (layer rows); else inputs carry their dtype
    default_dtype: Callable[[str], str]  # device -> the --dtype default
    header: Callable[[str], list[str]]  # reference -> the table's columns after impl, semantics, T, times, peaks
    columns: Callable[[dict], list[str]]  # a measured row -> its cells in those columns
    ratio_legend: Callable[[str | None], str]  # reference -> the line under the table
    aliases: dict[str, list[str]] = field(default_factory=dict)  # --only names that stand for several rows
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    config: Callable[[argparse.Namespace, Shape], dict] = lambda args, shape: {}  # recorded beside the common config
    describe: Callable[[argparse.Namespace, Shape, dict], list[str]] = lambda args, shape, env: []  # printed lines
    # measured before any row (on an idle device): printed lines and what the JSON records; rows' rates use it
    before_rows: Callable[[torch.device, argparse.Namespace], tuple[list[str], dict]] | None = None
    after_row: Callable[[dict, Impl, argparse.Namespace, dict], None] | None = None  # row, impl, args, before-rows
    notes: Callable[[dict[str, dict]], list[str]] = lambda rows: []  # printed after the table and recorded


# ----------------------------------------------------------------------------------------------------------------------
# One call, timed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str | None):
    if dtype in (None, "float32"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class Case:
    """One row's live objects: module, inputs (leaves requiring grad), output gradient g."""

    impl: Impl
    shape: Shape
    module: nn.Module
    inputs: tuple[Tensor, ...]
    g: Tensor


def make_case(impl: Impl, shape: Shape, args: argparse.Namespace, device: torch.device) -> tuple[Case, dict]:
    torch.manual_seed(args.seed)
    module, record = impl.build(shape, args)
    module = module.to(device)
    inputs = impl.inputs(shape, args, device)
    g = torch.randn(impl.out_shape(shape), device=device)
    return Case(impl, shape, module, inputs, g), record


def run_call(case: Case, backward: bool, device: torch.device, amp: str | None) -> tuple[float, Tensor]:
    """One forward (and backward) call; returns (seconds, y). Gradients are cleared before, outside the timing.
    ``amp``: the autocast dtype (None or "float32": none)."""
    case.module.zero_grad(set_to_none=True)
    for x in case.inputs:
        x.grad = None
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, amp):
        y = case.impl.call(case.module, *case.inputs)
    if backward:
        y.backward(case.g.to(y.dtype))  # = backward of (y * g).sum()
    sync(device)
    return time.perf_counter() - t0, y


def cuda_peak_call(case: Case, backward: bool, device: torch.device, amp: str | None) -> tuple[float, int]:
    """run_call with the CUDA peak above the memory allocated before it (bytes)."""
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    seconds, y = run_call(case, backward, device, amp)
    peak = torch.cuda.max_memory_allocated(device) - base
    del y
    return seconds, peak


def best_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of fn after ``warmup`` untimed ones, each bracketed by a device sync."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples


# ----------------------------------------------------------------------------------------------------------------------
# CPU peak memory: one call in a fresh subprocess, increase of the peak resident set size


def _proc_status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise OSError(f"no {name} in /proc/self/status")


def reset_peak_rss() -> tuple[int, str]:
    """Reset the kernel's RSS high-water mark to the current RSS; returns (baseline bytes, method)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return 1024 * _proc_status_kib("VmRSS"), "VmHWM"
    except OSError:  # no procfs, or not writable: the lifetime peak, which may hide a call smaller than the imports
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def peak_rss(method: str) -> int:
    if method == "VmHWM":
        return 1024 * _proc_status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def probe_main(bench: Bench, spec: dict) -> None:
    """Subprocess entry: build one row, run one call, print the peak-RSS increase as JSON on the last line."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    set_denormals(getattr(args, "denormals", "flush"))
    shape = Shape(**spec["shape"])
    device = torch.device("cpu")
    impl = bench.impls[spec["impl"]]
    amp = args.dtype if bench.autocast else None
    # One fwd+bwd call at a short T first, so that one-time costs (thread pool, lazy imports, kernel workspaces) are
    # not counted; then hand freed heap back to the OS so the measured call cannot hide in it.
    short = dataclasses.replace(shape, seq_len=min(shape.seq_len, 2 * shape.chunk_size))
    tiny, _ = make_case(impl, short, args, device)
    run_call(tiny, True, device, amp)
    del tiny
    case, _ = make_case(impl, shape, args, device)
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only
    except (AttributeError, OSError):
        pass
    base, method = reset_peak_rss()
    _, y = run_call(case, spec["phase"] == "fwdbwd", device, amp)
    peak = peak_rss(method)
    print(json.dumps({"peak_bytes": peak - base, "baseline_rss_bytes": base, "method": method}))


def cpu_peak_subprocess(bench: Bench, impl: str, phase: str, shape: Shape, args: argparse.Namespace,
                        threads: int) -> dict:
    plain = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str)) and not k.startswith("_")}
    spec = dict(impl=impl, phase=phase, shape=dataclasses.asdict(shape), threads=threads, args=plain)
    env = dict(os.environ)
    src = str(Path(mnemos.__file__).resolve().parents[1])  # the mnemos this process imported
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(bench.script), "--_probe", json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=max(600.0, 10 * args.max_call_s),
    )
    if proc.returncode != 0:
        return {"error": f"probe exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> dict:
    out = {"commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout.strip()
        status = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# Subnormal floats (|x| < 1.2e-38 in float32) cost ~100x a normal multiply-add on many Intel CPUs. The benchmarks'
# synthetic gates (eta = sigmoid(randn): some near 0) make a chunk's products of eta underflow into them after a few
# hundred tokens, which slowed the CPU torch path's Titans fwd+bwd at T 2048 3.5x on a Xeon with AVX-512 (2.5 s against
# 0.72 s flushed; nothing at T 512), while training a model with learned gates ran at the same speed either way
# (docs/PERFORMANCE.md, "Subnormal floats"). So the default flushes them to zero, as a trained model's speed is
# measured; --denormals keep measures the arithmetic as IEEE defines it.
DENORMALS_HELP = ("flush (default): subnormal floats become 0 (torch.set_flush_denormal; the synthetic gates' products "
                  "underflow into them and slow Intel CPUs ~100x per operation); keep: IEEE arithmetic")


def add_denormals_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--denormals", choices=["flush", "keep"], default="flush", help=DENORMALS_HELP)


def set_denormals(mode: str) -> bool:
    """``--denormals``: flush subnormal floats to zero (``"flush"``) or keep them (``"keep"``). Returns whether the
    CPU flushes them now (False where it cannot: ``torch.set_flush_denormal`` needs SSE3)."""
    return bool(torch.set_flush_denormal(mode == "flush")) and mode == "flush"


def environment(device: torch.device) -> dict:
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "titans_pytorch": version("titans-pytorch"),
        "triton": version("triton"),
        "flash_linear_attention": version("flash-linear-attention"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "triton_dot_precision": os.environ.get("MNEMOS_TRITON_DOT_PRECISION", "ieee"),
        "mnemos": getattr(mnemos, "__version__", None),
        "mnemos_path": str(Path(mnemos.__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **git_commit(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(bench: Bench, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=bench.description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="B")
    p.add_argument("--seq-len", type=int, help="T")
    p.add_argument("--dim", type=int, help="model width")
    p.add_argument("--heads", type=int, help="H")
    p.add_argument("--head-dim", type=int, help="D (default: dim // heads)")
    p.add_argument("--depth", type=int, help="memory MLP depth L")
    p.add_argument("--expansion", type=int, help="memory MLP hidden width factor E")
    p.add_argument("--chunk-size", type=int, help="C, tokens per gradient anchor")
    p.add_argument("--warmup", type=int, help="warm-up calls per row, >= 1 (cpu 1, cuda 3)")
    p.add_argument("--repeats", type=int, help="timed calls per row and phase (cpu 3, cuda 10)")
    p.add_argument("--only", nargs="+", choices=[*bench.impls, *bench.aliases],
                   help=f"rows to run (default: {' '.join(bench.default_rows)})")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: the CPUs this process may use)")
    p.add_argument("--max-call-s", type=float,
                   help="a row whose fwd+bwd call takes longer (best of 2) is measured at half the T, repeatedly "
                   "(cpu 120, cuda 30)")
    p.add_argument("--no-cpu-memory", action="store_true", help="skip the per-row peak-RSS subprocesses on CPU")
    p.add_argument("--seed", type=int, default=0)
    add_denormals_flag(p)
    p.add_argument("--out", type=Path, help=f"JSON path (default benchmarks/results/{bench.name}-<device>.json)")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    bench.add_arguments(p)
    args = p.parse_args(argv)
    if args._probe:
        return args
    args.dtype = args.dtype or bench.default_dtype(args.device)
    d = RUN_DEFAULTS[args.device]
    args.warmup = d["warmup"] if args.warmup is None else args.warmup
    args.repeats = d["repeats"] if args.repeats is None else args.repeats
    args.max_call_s = d["max_call_s"] if args.max_call_s is None else args.max_call_s
    if args.warmup < 1 or args.repeats < 1:
        p.error(f"--warmup and --repeats must be >= 1, got {args.warmup} and {args.repeats}")
    return args


def resolve_shape(args: argparse.Namespace) -> Shape:
    base = SHAPES[args.device]
    over = dict(batch=args.batch, seq_len=args.seq_len, dim=args.dim, heads=args.heads, depth=args.depth,
                expansion=args.expansion, chunk_size=args.chunk_size)
    shape = dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})
    if args.head_dim is not None:
        shape = dataclasses.replace(shape, head_dim=args.head_dim)
    elif args.dim is not None or args.heads is not None:
        if shape.dim % shape.heads:
            raise ValueError(f"--heads ({shape.heads}) must divide --dim ({shape.dim}) unless --head-dim is given")
        shape = dataclasses.replace(shape, head_dim=shape.dim // shape.heads)
    for k, v in dataclasses.asdict(shape).items():
        if v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")
    return shape


# ----------------------------------------------------------------------------------------------------------------------
# Formatting


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def fmt_seq_len(row: dict) -> str:
    T, asked = row["seq_len"], row["seq_len_requested"]
    return str(T) if T == asked or row["label"] != row["impl"] else f"{T} (of {asked})"


def fmt_load(load: tuple[float, ...] | None) -> str:
    return "-" if load is None else "/".join(f"{v:.2f}" for v in load)


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_num(x: float | None) -> str:
    """Three significant digits, no exponent for the usual range: 0.0123, 1.23, 123, 1234."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def measured(row: dict) -> bool:
    return not row["error"] and not row["skipped"]


def finite(row: dict) -> str:
    return "yes" if row["output_finite"] and row["input_grad_finite"] and row["shape_ok"] else "NO"


def print_table(bench: Bench, rows: list[dict], reference: str | None) -> None:
    header = ["impl", bench.header(reference or "-")[0], "T", "fwd ms", "fwd+bwd ms", "fwd peak", "fwd+bwd peak",
              *bench.header(reference or "-")[1:]]
    lines = []
    for row in rows:
        if row["skipped"]:
            lines.append([row["label"], row["semantics"], str(row["seq_len_requested"]), f"skipped: {row['skipped']}"])
            continue
        if row["error"]:
            what = "unavailable" if row["unavailable"] else "ERROR"
            lines.append([row["label"], row["semantics"], str(row["seq_len_requested"]), f"{what}: {row['error']}"])
            continue
        lines.append([row["label"], row["semantics"], fmt_seq_len(row), fmt_ms(row["fwd_ms"]), fmt_ms(row["fwdbwd_ms"]),
                      fmt_mib(row.get("fwd_peak_bytes")), fmt_mib(row.get("fwdbwd_peak_bytes")), *bench.columns(row)])
    widths = [max([len(h), *(len(line[i]) for line in lines if i < len(line) - 1 or len(line) == len(header))])
              for i, h in enumerate(header)]  # a list: every row may have been skipped
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())  # a skipped row is short


# ----------------------------------------------------------------------------------------------------------------------
# The run


def main(bench: Bench, argv=None) -> None:
    args = parse_args(bench, argv)
    if args._probe:
        probe_main(bench, json.loads(args._probe))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise SystemExit(f"error: --device cuda: CUDA is not available (torch {torch.__version__}, built with {build})")
    device = torch.device(args.device)
    try:
        shape = resolve_shape(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    flushed = set_denormals(args.denormals)
    names = list(dict.fromkeys(n for o in (args.only or bench.default_rows) for n in bench.aliases.get(o, [o])))
    amp = args.dtype if bench.autocast else None

    if device.type == "cuda":
        memory_method = "torch.cuda.max_memory_allocated() minus memory allocated before the call, max over repeats"
    elif args.no_cpu_memory:
        memory_method = "not measured (--no-cpu-memory)"
    else:
        memory_method = (
            "increase of the process's peak RSS over one call (VmHWM after resetting it through /proc/self/clear_refs; "
            "getrusage ru_maxrss where that is unavailable), in a fresh subprocess per row and phase"
        )
    env = dict(environment(device), denormals=args.denormals, denormals_flushed=flushed)
    config = {
        "rows": names,
        "shape": dataclasses.asdict(shape),
        "dtype": args.dtype,
        "state_dtype": "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median",
        "fwd": "forward with autograd recording (training forward)",
        "fwdbwd": "forward + y.backward(g), every input requires grad",
        "max_call_s": args.max_call_s,
        "memory_method": memory_method,
        "seed": args.seed,
        **bench.config(args, shape),
    }
    print(f"device: {env['device']} ({env['device_name']}), torch {env['torch']}, threads {env['torch_threads']} "
          f"(torch.set_num_threads; {env['logical_cpus']} logical CPUs), "
          f"mnemos {env['mnemos']} from {env['mnemos_path']}, "
          f"commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")
    print(f"shape: B={shape.batch} T={shape.seq_len} dim={shape.dim} H={shape.heads} D={shape.head_dim} "
          f"L={shape.depth} E={shape.expansion} C={shape.chunk_size}; dtype {config['dtype']}; "
          f"warmup {args.warmup}, median of {args.repeats}; subnormal floats "
          f"{'flushed to zero' if flushed else 'kept'} (--denormals)")
    for line in bench.describe(args, shape, env):
        print(line)
    print(f"peak memory: {memory_method}")

    before = {}
    if bench.before_rows is not None:  # before any row, on an idle device
        lines, before = bench.before_rows(device, args)
        for line in lines:
            print(line)

    # Build and warm up every row; the first call is fwd+bwd, checks the output and may shorten T.
    rows: dict[str, dict] = {}  # by label: the impl name, or "<reference>@T=..." for a reference at a shortened T
    cases: dict[str, Case] = {}

    def warm_up(label: str, impl: Impl, s: Shape, may_shrink: bool) -> None:
        row = {"label": label, "impl": impl.name, "semantics": impl.semantics, "seq_len_requested": s.seq_len,
               "skipped": None, "error": None, "unavailable": False, "notes": []}
        rows[label] = row
        row["skipped"] = impl.unavailable(device, args)
        if row["skipped"]:
            print(f"SKIP {label}: {row['skipped']}")
            return
        try:
            # pay one-time costs (lazy imports, thread pools, kernel workspaces) before the call that may shorten T
            tiny, _ = make_case(impl, dataclasses.replace(s, seq_len=min(s.seq_len, 2 * s.chunk_size)), args, device)
            run_call(tiny, True, device, amp)
            del tiny
            while True:
                case, row["constructor"] = make_case(impl, s, args, device)
                seconds, y = run_call(case, True, device, amp)
                if may_shrink and seconds > args.max_call_s:  # one more try, so that a passing stall cannot shrink T
                    del y
                    retry, y = run_call(case, True, device, amp)
                    seconds = min(seconds, retry)
                if not may_shrink or seconds <= args.max_call_s or s.seq_len // 2 < 2 * s.chunk_size:
                    break
                note = (f"{label}: fwd+bwd at T={s.seq_len} took {seconds:.1f} s (best of 2 calls) > --max-call-s "
                        f"{args.max_call_s:g}; measuring at T={s.seq_len // 2} instead")
                print("NOTE: " + note)
                row["notes"].append(note)
                del case, y
                s = dataclasses.replace(s, seq_len=s.seq_len // 2)
            row["seq_len"] = s.seq_len
            row["shape"] = dataclasses.asdict(s)
            row["first_call_ms"] = 1e3 * seconds
            row["output_shape"] = list(y.shape)
            row["shape_ok"] = tuple(y.shape) == tuple(impl.out_shape(s))
            row["output_finite"] = bool(torch.isfinite(y).all())
            row["input_grad_finite"] = all(x.grad is not None and bool(torch.isfinite(x.grad).all())
                                           for x in case.inputs)
            row["params"] = sum(p.numel() for p in case.module.parameters())
            row["params_with_grad"] = sum(p.numel() for p in case.module.parameters() if p.grad is not None)
            del y
            for _ in range(args.warmup - 1):
                run_call(case, True, device, amp)
            cases[label] = case
        except Exception as e:  # record the failure, keep the other rows
            row["error"] = f"{type(e).__name__}: {e}"
            row["unavailable"] = impl.optional
            print(f"{'UNAVAILABLE' if impl.optional else 'ERROR in'} {label}: {row['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for name in names:
        warm_up(name, bench.impls[name], shape, may_shrink=True)
    # Ratios are taken against the reference row. A row measured at a shortened T gets a reference at that T, so that
    # its ratios still mean something.
    reference = next((n for n in bench.references if n in rows and measured(rows[n])), None)
    if reference is not None:
        shortened = {r["seq_len"] for r in list(rows.values()) if measured(r)}
        for T in sorted(shortened - {rows[reference]["seq_len"]}):
            warm_up(f"{reference}@T={T}", bench.impls[reference], dataclasses.replace(shape, seq_len=T),
                    may_shrink=False)

    # Timed repeats, interleaved across rows.
    for phase, backward in (("fwd", False), ("fwdbwd", True)):
        samples = {n: [] for n in cases}
        peaks = {n: [] for n in cases}
        for _ in range(args.repeats):
            for name, case in cases.items():
                if rows[name]["error"]:
                    continue
                try:
                    if device.type == "cuda":
                        seconds, peak = cuda_peak_call(case, backward, device, amp)
                        peaks[name].append(peak)
                    else:
                        seconds, y = run_call(case, backward, device, amp)
                        del y
                    samples[name].append(seconds)
                except Exception as e:
                    rows[name]["error"] = f"{type(e).__name__} in {phase}: {e}"
                    print(f"ERROR in {name}: {rows[name]['error']}")
        for name in cases:
            rows[name][f"{phase}_ms_samples"] = [1e3 * t for t in samples[name]]
            rows[name][f"{phase}_ms"] = 1e3 * statistics.median(samples[name]) if samples[name] else None
            if device.type == "cuda":
                rows[name][f"{phase}_peak_bytes"] = max(peaks[name]) if peaks[name] else None
        # as each phase ends (a run stopped by a time limit keeps what it measured; the table comes at the end)
        done = [f"{n} {rows[n][f'{phase}_ms']:.4g}" for n in cases if rows[n][f"{phase}_ms"] is not None]
        print(f"{phase} medians (ms): {', '.join(done) or 'none'}", flush=True)
    cases.clear()
    gc.collect()

    # CPU peak memory, one fresh subprocess per row and phase.
    if device.type == "cpu" and not args.no_cpu_memory:
        for name, row in rows.items():
            if not measured(row):
                continue
            for phase in ("fwd", "fwdbwd"):
                res = cpu_peak_subprocess(bench, row["impl"], phase, Shape(**row["shape"]), args, threads)
                row[f"{phase}_peak_bytes"] = res.get("peak_bytes")
                row[f"{phase}_peak_method"] = res.get("method")
                if "error" in res:
                    row["notes"].append(f"memory probe {phase}: {res['error']}")
                    print(f"WARNING: {name} memory probe {phase}: {res['error']}")

    # Ratios against the reference row at the same T; what the script adds per row (op rows: achieved rates).
    refs = {r["seq_len"]: r for r in rows.values() if measured(r) and r["impl"] == reference}
    for row in rows.values():
        ref = refs.get(row.get("seq_len"))
        row["ratio_reference"] = ref["label"] if ref is not None and measured(row) else None
        pairs = (("ratio_fwd", "fwd_ms"), ("ratio_fwdbwd", "fwdbwd_ms"), ("ratio_peak_fwdbwd", "fwdbwd_peak_bytes"))
        for key, src in pairs:
            a, b = (row.get(src), ref.get(src)) if row["ratio_reference"] else (None, None)
            row[key] = a / b if a is not None and b else None
        if bench.after_row is not None and measured(row):
            bench.after_row(row, bench.impls[row["impl"]], args, before)

    print_table(bench, list(rows.values()), reference)
    print(bench.ratio_legend(reference))
    for row in rows.values():
        for note in row["notes"]:
            print("NOTE: " + note)
        if measured(row) and not (row["output_finite"] and row["input_grad_finite"] and row["shape_ok"]):
            print(f"WARNING: {row['label']} sanity check failed: output shape {row['output_shape']}, finite output "
                  f"{row['output_finite']}, finite input grad {row['input_grad_finite']}")
    for row in rows.values():
        for phase, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            xs = row.get(f"{phase}_ms_samples") or []
            if len(xs) > 1 and max(xs) > 1.5 * min(xs):
                print(f"WARNING: noisy timings, {row['label']} {label} samples range {min(xs):.0f}-{max(xs):.0f} ms "
                      f"(another process on the machine?); all samples are in the JSON")
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average at start {fmt_load(env['loadavg_start'])}, at end {fmt_load(env['loadavg_end'])} "
          f"({env['logical_cpus']} logical CPUs)")
    notes = bench.notes(rows)
    for note in notes:
        print(note)

    out = args.out or REPO / "benchmarks" / "results" / f"{bench.name}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": bench.name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "env": env,
        "config": config,
        "notes": notes,
        "rows": list(rows.values()),
        "reference": reference,
        **before,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------------------------------
# Ceilings: what this device reaches on a large matmul and a large copy, measured in the same run as the rows

CEILING_SIZES = {  # matmul n (an n x n x n product), copy tensor bytes, warm-up calls, timed calls (best one reported)
    "cuda": dict(matmul_n=8192, copy_bytes=2**30, warmup=3, repeats=10),
    "cpu": dict(matmul_n=1024, copy_bytes=2**27, warmup=1, repeats=3),
}
H100_REFERENCE = {"tflops_bf16_matmul": 776.0, "copy_gbps": 3000.0}  # what an H100 SXM reaches on these two tests


def _matmul_samples(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    return best_seconds(lambda: torch.mm(a, b, out=c), device, warmup, repeats)


def _copy_samples(device: torch.device, nbytes: int, warmup: int, repeats: int) -> list[float]:
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return best_seconds(lambda: dst.copy_(src), device, warmup, repeats)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Matmul TFLOP/s (``torch.mm`` of two n x n matrices in ``dtype``) and copy GB/s (``dst.copy_(src)`` of one large
    tensor, read + write counted); each the best of the timed calls."""
    size = CEILING_SIZES[device.type]
    n, nbytes = size["matmul_n"], size["copy_bytes"]
    mm = _matmul_samples(device, dtype, n, size["warmup"], size["repeats"])
    cp = _copy_samples(device, nbytes, size["warmup"], size["repeats"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mm_flops, cp_bytes = flops.matmul_flops(n, n, n), flops.copy_bytes(nbytes)
    return {
        "matmul": {"m_n_k": [n, n, n], "dtype": str(dtype).removeprefix("torch."), "flops": mm_flops,
                   "samples_ms": [1e3 * t for t in mm], "tflops": mm_flops / min(mm) / 1e12},
        "copy": {"tensor_bytes": nbytes, "bytes_moved": cp_bytes, "samples_ms": [1e3 * t for t in cp],
                 "gbps": cp_bytes / min(cp) / 1e9},
        "method": f"best of {size['repeats']} calls after {size['warmup']} warm-up, each bracketed by a "
                  "device synchronise; copy counts read + write",
    }


def ceilings(device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict]:
    """The ceilings in ``dtype``, the lines that print them, and what the JSON records of them (a Bench's
    ``before_rows``)."""
    c = measure_ceilings(device, dtype)
    mm, cp = c["matmul"], c["copy"]
    n = mm["m_n_k"][0]
    lines = [f"ceilings (this run, {c['method']}): matmul {mm['dtype']} {n}x{n}x{n} {fmt_num(mm['tflops'])} TFLOP/s; "
             f"copy of {cp['tensor_bytes'] / 2**20:.0f} MiB {fmt_num(cp['gbps'])} GB/s"]
    if device.type == "cuda":
        ref = H100_REFERENCE
        lines.append(f"  (an H100 SXM reaches about {ref['tflops_bf16_matmul']:.0f} TFLOP/s bf16 and "
                     f"{ref['copy_gbps'] / 1e3:.0f} TB/s on these)")
    return lines, {"ceilings": {**c, "h100_reference": H100_REFERENCE}}


def add_throughput(row: dict, impl: Impl, args: argparse.Namespace, before: dict) -> None:
    """Achieved TFLOP/s and GB/s of a measured row (median time) with analytic counts (``Impl.counts``), and their
    shares of the ceilings (a Bench's ``after_row``)."""
    if impl.counts is None:
        return
    c = before["ceilings"]
    counts = impl.counts(Shape(**row["shape"]), args)
    row["counts"] = counts
    for phase in ("fwd", "fwdbwd"):
        ms = row.get(f"{phase}_ms")
        tflops = counts[phase]["flops"] / (ms / 1e3) / 1e12 if ms else None
        gbps = counts[phase]["bytes"] / (ms / 1e3) / 1e9 if ms else None
        row[f"{phase}_tflops"], row[f"{phase}_gbps"] = tflops, gbps
        row[f"{phase}_pct_peak"] = 100 * tflops / c["matmul"]["tflops"] if tflops is not None else None
        row[f"{phase}_pct_bw"] = 100 * gbps / c["copy"]["gbps"] if gbps is not None else None
