"""Compile the memory-rule Triton kernels ahead of time for an H100 (sm_90a) and print their resource use.

Needs no GPU: Triton's compiler and the CUDA tools it ships (ptxas, cuobjdump) run on the CPU. It shows that every
kernel compiles for the GPU (the tests run them under the interpreter only) and how many registers, local-memory
spill bytes (STACK) and shared memory each uses at a given shape. Spilling is the first thing to look at when the
kernels are slow on a GPU.

Usage:
    python benchmarks/compile_kernels.py                      # GPU shape: C 16, K = V = 64, hidden 256
    python benchmarks/compile_kernels.py --chunk 32 --head-dim 128 --hidden 512 --warps 4 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even where the tests set it
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mnemos.ops.memory_rule import triton_d1, triton_d2  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int = 1, arch: int = 90):
    """Every pointer argument (``*_ptr``) is float32 (the launchers pass compute-dtype tensors), scalars int32."""
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else ("*fp32" if name.endswith("_ptr") else "i32")
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def resource_usage(kernel) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    line = next((ln.strip() for ln in out.stdout.splitlines() if "REG:" in ln), "?")
    fields = dict(p.split(":", 1) for p in line.split() if ":" in p)
    return f"registers {fields.get('REG', '?'):>3}  spill (STACK) {fields.get('STACK', '?'):>5} B"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the depth-2 memory")
    p.add_argument("--block-h", type=int, default=32, help="depth-2 hidden units per tile")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--precision", default="ieee", choices=["ieee", "tf32", "tf32x3"])
    args = p.parse_args(argv)
    C, D, HD = args.chunk, args.head_dim, args.hidden
    print(f"triton {triton.__version__}, target sm_90a; C {C}, K = V = {D}, hidden {HD}, dots {args.precision}")
    bv = min(D, max(16, 4096 // D))
    for warps in args.warps:
        for name, fn, const in (
            ("depth 1 fwd", triton_d1._fwd_kernel, dict(C=C, K=D, V=D, BV=bv, RESIDUAL=False, L2=True, HAS_A=False,
                                                         SAVE=True, ACC=tl.float32, PREC=args.precision)),
            ("depth 1 bwd", triton_d1._bwd_kernel, dict(C=C, K=D, V=D, BV=bv, RESIDUAL=False, L2=True, HAS_A=False,
                                                         HAS_DWS=True, HAS_DLAST=True, ACC=tl.float32,
                                                         PREC=args.precision)),
            ("depth 2 fwd", triton_d2._fwd_kernel, dict(C=C, K=D, HD=HD, V=D, BLOCK_H=args.block_h, RESIDUAL=True,
                                                         ACT=0, LOSS=0, HAS_A=False, SAVE=True, EVERY=16,
                                                         ACC=tl.float32, PREC=args.precision)),
            ("depth 2 bwd", triton_d2._bwd_kernel, dict(C=C, K=D, HD=HD, V=D, BLOCK_H=args.block_h, RESIDUAL=True,
                                                         ACT=0, LOSS=0, HAS_A=False, HAS_DLAST=True, EVERY=16,
                                                         ACC=tl.float32, PREC=args.precision)),
        ):
            t = time.perf_counter()
            k = compile_kernel(fn, const, warps)
            print(f"  {name}  warps {warps}:  {resource_usage(k)}  shared {k.metadata.shared:>6} B  "
                  f"(compiled in {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
