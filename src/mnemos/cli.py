"""The ``mnemos`` command. Each subcommand parses flags and calls one library function; nothing imports this file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

import torch

from . import __version__


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of threads >= 1, got {text!r}")
    return n


def _set_threads(n: int) -> None:
    """``--threads N``: torch's intra-op threads, and its inter-op threads while they can still be set (torch allows
    that only before any inter-op parallel work has run in the process)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def _demo(args: argparse.Namespace) -> int:
    from .train.demo import PAPER_VARIANTS, DemoConfig, run_demo

    gpu = torch.cuda.is_available()  # on a GPU the same command trains longer and wider models (not yet run on one)
    steps = args.steps if args.steps is not None else (3000 if gpu else DemoConfig.steps)
    cfg = DemoConfig(memory_variant=args.variant, steps=steps, d_model=128 if gpu else 64, seed=args.seed,
                     out_dir=args.out)
    print(f"mnemos {__version__} · torch {torch.__version__} · {torch.get_num_threads()} threads")
    article = "a Titans" if cfg.memory_variant in PAPER_VARIANTS else "an" if cfg.memory_variant[0] in "aeiou" else "a"
    print(
        f"Training {article} {cfg.memory_variant.upper()} model "
        f"and a sliding-window-attention (SWA) model of the same size on\nassociative recall (MQAR: "
        f"{cfg.num_kv_pairs} key-value pairs, then queries; vocabulary {cfg.vocab_size}), {cfg.steps} steps each.\n"
        f"The SWA stack ({cfg.n_layers} layers of window {cfg.window}) sees at most {cfg.reach} tokens back; "
        + (f"the {cfg.memory_variant.upper()} model has no attention at all: its only token mixer is the neural "
           "memory.\n" if cfg.memory_only else
           f"the {cfg.memory_variant.upper()} model has the same window plus a neural memory.\n"), flush=True,
    )
    report = run_demo(cfg)
    print("\nRecall accuracy at the queries, by how far back the queried pair sits (chance "
          f"{2 / cfg.vocab_size:.2f}; counts in brackets):\n")
    print(report.table())
    print(f"\nwritten: {cfg.out_dir}/demo.md, demo.json, demo.png (and each model's run directory)")
    return 0


def _memorize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval.memorize import MemorizeConfig, run_memorize

    cfg = MemorizeConfig(
        head_dim=args.head_dim, n_pairs=args.pairs, depths=args.depths, chunk_sizes=args.chunks, passes=args.passes,
        theta=args.theta, eta=args.eta, seed=args.seed,
    )
    if args.json and not Path(args.json).resolve().parent.is_dir():  # before the runs, not after them
        raise FileNotFoundError(f"--json {args.json}: the directory {Path(args.json).parent} does not exist")
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


def _budget(text: str) -> float | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, 'auto' or 'none', got {text!r}") from None


def _kv_policy(text: str) -> list:
    """``--kv-policy SPEC``: the policies it names (a sweep gives several), each constructed so a bad spec is an
    argparse error naming the flag, in one line."""
    from .kv.spec import parse_policy_spec

    try:
        return parse_policy_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(" ".join(str(e).split())) from None


def _eval(args: argparse.Namespace) -> int:
    import time

    from .eval.harness import EvalOptions, run_eval
    from .eval.tasks import TASKS

    task = TASKS[args.task]  # the config(s) and options its flags describe are the task's own
    options = EvalOptions(
        batch_size=args.batch_size, stream_chunk=args.stream_chunk, memory_budget_gb=args.memory_budget_gb,
        keep_samples=not args.no_samples, progress=False if args.no_progress else None,
        raise_errors=args.raise_errors, jrt=args.jrt, **task.eval_options(args),
    )
    out = args.out or f"eval_results/{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    results = run_eval(args.model, task.from_args(args), seed=args.seed, options=options, out_dir=out,
                       device=args.device, dtype=dtype, plots=not args.no_plots,
                       kv_policies=[p for specs in args.kv_policy for p in specs])
    print(results.markdown())
    print(f"results, report and figures written to {out}/")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .eval.report import report

    written = report(args.results, args.out, plots=not args.no_plots)
    print(written[1].read_text())
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.loop import train

    cfg = load_config(_preset_path(args.preset) if args.preset else args.config, args.overrides)
    if args.resume:  # checked before train() creates run.out_dir
        from pathlib import Path

        ckpt = Path(cfg.run.out_dir) / "checkpoint"
        if not (ckpt / "trainer.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt} (run.out_dir={cfg.run.out_dir}); train "
                                    "without --resume to start the run")
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if result.final_eval:
        print("final eval: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in result.final_eval.items()))
    print(f"{result.step} steps, {result.tokens_per_s:,.0f} tokens/s; run directory {result.out_dir}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval.study import check_study_dir, remove_stale_runs, run_study, study_settings, write_study_report

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = args.out or f"runs/study-{args.study}" + ("" if size == "full" else f"-{size}")
    settings = study_settings(size)
    if args.report_only:
        if args.only is not None or args.jobs != 1 or args.retrain_stale:
            raise ValueError("--report-only trains nothing: it takes none of --only, --jobs, --retrain-stale (the "
                             "report covers every run and eval done)")
        if not (Path(out) / "study_settings.json").is_file():
            raise ValueError(f"--report-only: {out} holds no study (no study_settings.json); give the --out of one")
        check_study_dir(settings, out)
        write_study_report(settings, out)
    else:
        if args.retrain_stale:
            check_study_dir(settings, out)
            removed = remove_stale_runs(settings, out)
            print(f"study: removed {len(removed)} run(s) trained under other settings, and their evals"
                  + (f": {', '.join(removed)}" if removed else ""), file=sys.stderr, flush=True)
        run_study(settings, out, jobs=args.jobs, only=args.only, threads=args.threads)
    print((Path(out) / "report.md").read_text())
    return 0


def _preset_path(name: str):
    from pathlib import Path

    presets = Path(__file__).parent / "train" / "presets"
    path = presets / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in presets.glob("*.yaml"))
        raise ValueError(f"unknown preset {name!r}; presets: {names}")
    return path


THREADS_HELP = "CPU threads torch uses (torch.set_num_threads; default: torch's choice, one per core)"
DEBUG_HELP = "on an error, show the Python traceback (default: one line naming what is wrong)"


def _debug_flag(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--debug``, before or after the subcommand (a subcommand's copy sets the value only when given)."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnemos", description="The memory hierarchy of sequence models.")
    p.add_argument("--version", action="version", version=f"mnemos {__version__}")
    _debug_flag(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)

    from .eval.memorize import MemorizeConfig
    from .eval.registry import ints_arg
    from .train.demo import DEMO_VARIANTS

    d = {f.name: f.default for f in fields(MemorizeConfig)}
    dm = sub.add_parser("demo", help="train a Titans model and an SWA baseline on recall; show what memory adds")
    dm.add_argument("--variant", default="lmm", choices=DEMO_VARIANTS,
                    help="the memory model: a Titans model (lmm, mal, mag, mac) or a memory-only model of its family "
                         "(moneta, yaad, memora: Miras; atlas); default %(default)s")
    dm.add_argument("--steps", type=int, default=None, help="training steps per model (default 800 on CPU, 3000 on CUDA)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default %(default)s)")
    dm.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP)
    _debug_flag(dm)
    dm.set_defaults(func=_demo)

    demo = sub.add_parser("memorize", help="test-time memorisation: recall of N key->value pairs vs depth and chunk size")
    demo.add_argument("--head-dim", type=int, default=d["head_dim"], help="key/value width D (default %(default)s)")
    demo.add_argument("--pairs", type=ints_arg, default=d["n_pairs"], help="numbers of pairs, e.g. 16,32,64")
    demo.add_argument("--depths", type=ints_arg, default=d["depths"], help="memory depths, e.g. 1,2,3")
    demo.add_argument("--chunks", type=ints_arg, default=d["chunk_sizes"], help="chunk sizes, e.g. 1,16,64")
    demo.add_argument("--passes", type=int, default=d["passes"], help="times the pairs are written (default %(default)s)")
    demo.add_argument("--theta", type=float, default=d["theta"], help="inner learning rate (default %(default)s)")
    demo.add_argument("--eta", type=float, default=d["eta"], help="momentum (default %(default)s)")
    demo.add_argument("--seed", type=int, default=d["seed"])
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    _debug_flag(demo)
    demo.set_defaults(func=_memorize)
    _add_eval_parser(sub)

    tr = sub.add_parser(
        "train", help="train a model (config file or preset, plus section.key=value overrides; torchrun-ready)",
        description="Train a mnemos model. Overrides take the form section.key=value (or --section.key=value), "
                    "e.g. model.variant=lmm model.memory.chunk_size=8 optim.lr=1e-3 run.steps=500.",
    )
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="YAML run config (sections model, task, optim, run)")
    src.add_argument("--preset", metavar="NAME", help="a shipped config: mqar, lm")
    tr.add_argument("--resume", action="store_true", help="continue from run.out_dir/checkpoint")
    tr.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP)
    tr.add_argument("overrides", nargs="*", metavar="section.key=value")
    _debug_flag(tr)
    tr.set_defaults(func=_train)

    st = sub.add_parser("study", help="a reproducible, resumable study: train the models, evaluate, report")
    studies = st.add_subparsers(dest="study", required=True, metavar="STUDY")
    rs = studies.add_parser(
        "recall", help="MQAR grid, length extrapolation, passkey to 1M tokens, state capacity (docs/BENCHMARKS.md)",
        description="Train every model of the recall study, evaluate the chosen-lr runs and write report.md, "
                    "results.json and plots to --out. Re-running continues where a killed study stopped.")
    size = rs.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the same pipeline at small settings (<= 20 min on 2 cores)")
    size.add_argument("--tiny", action="store_true", help="a few steps per run, to check the pipeline (< 1 min)")
    rs.add_argument("--out", metavar="DIR", help="study directory (default runs/study-recall[-quick|-tiny])")
    rs.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                    help="trainings at a time: 2 runs two subprocesses (default %(default)s)")
    rs.add_argument("--threads", type=_threads, metavar="N",
                    help=THREADS_HELP + "; with --jobs 2 each subprocess gets N (default 1)")
    rs.add_argument("--only", metavar="PATTERN",
                    help="run only the runs / evals whose name matches (glob; plain text matches anywhere), and the "
                         "evals of the runs it matches; the report still covers everything done")
    rs.add_argument("--retrain-stale", action="store_true",
                    help="first delete the runs trained under other settings than the study's (a changed schedule or "
                         "model default; the study refuses to continue while any is left), the runs fine-tuned from "
                         "them and their evals; then train and evaluate them again")
    rs.add_argument("--report-only", action="store_true",
                    help="write the report from the runs and evals done so far; train and evaluate nothing (safe "
                         "beside a study that is running)")
    _debug_flag(rs)
    rs.set_defaults(func=_study)

    rep = sub.add_parser("report", help="merge eval results (JSON) into one comparison table and figures")
    rep.add_argument("results", nargs="+", metavar="RESULTS.json", help="files written by mnemos eval (results.json)")
    rep.add_argument("--out", required=True, metavar="DIR", help="where to write results.json, report.md, PNGs")
    rep.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    _debug_flag(rep)
    rep.set_defaults(func=_report)
    return p


def _add_eval_parser(sub) -> None:
    from .eval.tasks import TASKS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", action="append", required=True, metavar="SPEC",
                        help="checkpoint path, Hugging Face directory, mnemos variant (untrained; config fields as "
                             "in train: VARIANT:model.KEY=VALUE,...) or baseline:induction[:ORDER] / "
                             "baseline:random; repeat to compare models")
    common.add_argument("--kv-policy", type=_kv_policy, action="append", default=[], metavar="SPEC",
                        help="evaluate each attention model with this KV-cache policy (mnemos.kv; docs/KV.md): "
                             "NAME[:KEY=VALUE,...], e.g. snapkv:budget=256,window_size=16, kivi:bits=2, "
                             "h2o:budget=64+kivi:bits=2; several values sweep (snapkv:budget=64,128,256); 'none' is "
                             "the model's own cache; repeat to compare policies. Models without a KV cache (recurrent, "
                             "neural memory) run once, as they are")
    common.add_argument("--seed", type=int, default=0, help="data seed (default %(default)s)")
    common.add_argument("--batch-size", type=int, default=8, help="sequences per forward call (default %(default)s)")
    common.add_argument("--stream-chunk", type=int, default=None, metavar="TOKENS",
                        help="feed contexts this many tokens per call, carrying the state (default: one call)")
    common.add_argument("--memory-budget-gb", type=_budget, default="auto", metavar="GIB",
                        help="refuse contexts whose growing (attention) state would exceed this many GiB; 'auto' "
                             "(default): 80%% of the device's memory; 'none': no limit")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights dtype for loaded models (default %(default)s)")
    common.add_argument("--out", metavar="DIR", help="output directory (default eval_results/TASK-DATE-TIME)")
    common.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--no-samples", action="store_true", help="do not record each prompt's prediction")
    common.add_argument("--raise-errors", action="store_true",
                        help="stop at the first failing cell (default: record the error in it and go on)")
    common.add_argument("--jrt", action="store_true",
                        help="also run JRT-Prompt (just read twice): the task's context repeated before its queries, "
                             "reported beside the plain score as '<model> (JRT-Prompt)'; tasks without a separable "
                             "context (lm) refuse it (docs/BENCHMARKS.md)")
    common.add_argument("--threads", type=_threads, metavar="N", help=THREADS_HELP)
    _debug_flag(common)

    ev = sub.add_parser("eval", help="evaluate models on a benchmark task (see docs/BENCHMARKS.md)")
    tasks = ev.add_subparsers(dest="task", required=True, metavar="TASK")
    for task in TASKS.values():  # each registered task adds its own flags
        t = tasks.add_parser(task.name, parents=[common], help=task.help)
        task.add_arguments(t)
        t.set_defaults(func=_eval)


# What a user's input causes: a bad value, type or name (config type errors are ValueErrors too:
# mnemos.models.config.ConfigTypeError), a missing or unreadable file, a missing optional package. Reported in one line
# with exit code 2, like argparse's own errors; anything else is a bug and keeps its traceback.
USAGE_ERRORS = (ValueError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top-level flags take no values
    if command == "train":  # --model.d_model=64 is an override, not a flag
        argv = [a[2:] if a.startswith("--") and "=" in a and "." in a.split("=")[0] else a for a in argv]
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        _set_threads(args.threads)  # before any work
    try:
        return args.func(args)
    except USAGE_ERRORS as e:
        if args.debug:
            raise
        print(f"mnemos {args.command}: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
