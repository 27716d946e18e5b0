"""The ``mnemos`` command. Each subcommand parses flags and calls one library function; nothing imports this file."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from . import __version__


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _demo(args: argparse.Namespace) -> int:
    from .eval.memorize import MemorizeConfig, run_memorize

    cfg = MemorizeConfig(
        head_dim=args.head_dim, n_pairs=args.pairs, depths=args.depths, chunk_sizes=args.chunks, passes=args.passes,
        theta=args.theta, eta=args.eta, seed=args.seed,
    )
    print(f"mnemos {__version__} · torch {torch.__version__} · {torch.get_num_threads()} threads")
    print(
        f"Writing N random key->value pairs (D={cfg.head_dim}, unit norm) into a neural memory by test-time gradient "
        f"descent\n(theta={cfg.theta}, eta={cfg.eta}, alpha=0, {cfg.passes} passes), then reading every key back. "
        "Recall = fraction of keys\nwhose answer is nearest (cosine) to their own value; chance is 1/N.\n"
    )
    total = len(cfg.depths) * len(cfg.chunk_sizes) * len(cfg.n_pairs)
    done = [0]

    def progress(r):
        done[0] += 1
        print(f"\r  run {done[0]}/{total}: depth {r.depth}, chunk {r.chunk_size}, N={r.n_pairs}: "
              f"recall {r.recall:.2f}   ", end="", file=sys.stderr, flush=True)

    tty = sys.stderr.isatty()
    report = run_memorize(cfg, progress=progress if tty else None)
    if tty:
        print("\r" + " " * 80 + "\r", end="", file=sys.stderr)
    print(report.table())
    print("\ndepth 1 = matrix memory M(x) = Wx (starts empty); depth >= 2 = residual MLP memory (expansion "
          f"{cfg.expansion}, random W_0).\nchunk = tokens per gradient anchor (1 = plain online gradient descent).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnemos", description="The memory hierarchy of sequence models.")
    p.add_argument("--version", action="version", version=f"mnemos {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    from .eval.memorize import MemorizeConfig

    d = {f.name: f.default for f in fields(MemorizeConfig)}
    demo = sub.add_parser("demo", help="test-time memorisation: recall of N key->value pairs vs depth and chunk size")
    demo.add_argument("--head-dim", type=int, default=d["head_dim"], help="key/value width D (default %(default)s)")
    demo.add_argument("--pairs", type=_ints, default=d["n_pairs"], help="numbers of pairs, e.g. 16,32,64")
    demo.add_argument("--depths", type=_ints, default=d["depths"], help="memory depths, e.g. 1,2,3")
    demo.add_argument("--chunks", type=_ints, default=d["chunk_sizes"], help="chunk sizes, e.g. 1,16,64")
    demo.add_argument("--passes", type=int, default=d["passes"], help="times the pairs are written (default %(default)s)")
    demo.add_argument("--theta", type=float, default=d["theta"], help="inner learning rate (default %(default)s)")
    demo.add_argument("--eta", type=float, default=d["eta"], help="momentum (default %(default)s)")
    demo.add_argument("--seed", type=int, default=d["seed"])
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    demo.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # configuration errors: one clear line, no traceback
        print(f"mnemos {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
