"""Does a trained model pay for subnormal floats on this CPU? One fwd+bwd of a batch of random tokens through saved
runs, with torch's flush-to-zero switch off (IEEE arithmetic: what a user's process gets) and on, interleaved, the
minimum of --repeats each; the ratio says what subnormals cost outside anything that already flushes them.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/subnormals.py results/probes/passkey-floor-B-s1 \\
        results/study-recall/runs/passkey-lmm-x4 --batch 16 --len 512

On x86 an operation on a subnormal costs ~100 normal ones; the compiled CPU loop (cpu_scan.cpp) flushes them inside
its kernels since session 29, so a ratio near 1 means nothing else in the model meets them (docs/PERFORMANCE.md,
"Subnormal floats"). Each RUN is a run directory holding config.json and checkpoint/ (as `mnemos train` writes).
"""
import argparse
import time
from pathlib import Path

import torch

from mnemos.eval.adapters import load_mnemos_checkpoint


def fwd_bwd_seconds(model: torch.nn.Module, x: torch.Tensor, flush: bool) -> float:
    torch.set_flush_denormal(flush)
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    logits, _ = model(x)
    logits.float().mean().backward()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (config.json + checkpoint/)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--len", type=int, default=512, help="tokens a sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{'run':60s} {'IEEE s':>8s} {'flushed s':>10s} {'ratio':>6s}")
    for run in a.runs:
        run = Path(run)
        if not (run / "config.json").is_file() or not (run / "checkpoint").is_dir():
            raise SystemExit(f"{run}: expected a run directory with config.json and checkpoint/")
        model = load_mnemos_checkpoint(run / "checkpoint", device="cpu").model  # the model its run config builds
        x = torch.randint(0, model.config.vocab_size, (a.batch, a.len), generator=torch.Generator().manual_seed(0))
        fwd_bwd_seconds(model, x, True)  # warm-up: builds the compiled loop, sizes the allocator
        times = {False: [], True: []}
        for _ in range(a.repeats):
            for flush in (False, True):
                times[flush].append(fwd_bwd_seconds(model, x, flush))
        torch.set_flush_denormal(False)
        ieee, flushed = min(times[False]), min(times[True])
        print(f"{str(run):60s} {ieee:8.3f} {flushed:10.3f} {ieee / flushed:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
