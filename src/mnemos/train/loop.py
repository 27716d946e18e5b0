"""The training loop of ``mnemos train``, top to bottom: setup, data, model, optimizer, loop, eval, checkpoints.

Runs as one process or under ``torchrun --nproc_per_node N`` (DDP or FSDP2). ``run.batch_size`` is the global batch:
every rank draws the same global batch from a generator seeded by (seed, step) and takes its own slice, so N ranks
see exactly the data of one process and the loss matches it within float tolerance. The same rule makes resuming
bit-exact: the batch of step s depends only on (seed, s), never on how the run got to s.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict

from .. import __version__
from ..data import IGNORE_INDEX, LMDataConfig, MQARConfig
from ..models import MnemosLM, saved_model_config
from .checkpoint import load_model_weights, read_trainer_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown, wrap_model
from .optim import build_optimizer, build_scheduler

# consecutive steps with non-finite gradients (each skipped) after which training stops as diverged
MAX_SKIPPED_IN_A_ROW = 10


# ----------------------------------------------------------------------------------------------------------------------
# data: a task is a function (step, split) -> (inputs [B, T], labels [B, T]) that depends on nothing else


class TaskData:
    """Batches of the configured task. ``batch(step, n, generator_seed)`` is a pure function of its arguments."""

    def __init__(self, cfg: TrainConfig):
        t, seed = cfg.task, cfg.run.seed
        self.kind = t.kind
        if t.kind == "mqar":
            common = dict(vocab_size=t.vocab_size, seq_len=t.seq_len, num_kv_pairs=t.num_kv_pairs, power_a=t.power_a)
            self.train = MQARConfig(num_examples=t.train_examples, **common).build(seed)
            self.val = MQARConfig(num_examples=t.eval_examples, **common).build(seed + 1_000_003)
        else:
            self.lm = LMDataConfig(seq_len=t.seq_len, paths=t.paths, val_fraction=t.val_fraction).build(seed)

    def batch(self, step: int, size: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if self.kind == "mqar":
            inputs, labels = self.train if split == "train" else self.val
            idx = torch.randint(0, inputs.shape[0], (size,), generator=g)
            return inputs[idx], labels[idx]
        tokens = self.lm.train if split == "train" else self.lm.val  # [N] int64
        T = self.lm.seq_len
        starts = torch.randint(0, tokens.numel() - T, (size,), generator=g)  # [B]
        windows = tokens[starts[:, None] + torch.arange(T + 1)]  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]

    def eval_batches(self, size: int, max_batches: int, seed: int):
        if self.kind == "mqar":
            inputs, labels = self.val
            for i in range(0, min(inputs.shape[0], size * max_batches), size):
                yield inputs[i : i + size], labels[i : i + size]
        else:
            for i in range(max_batches):
                yield self.batch(i, size, seed + 7, split="val")


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled positions, number of correct argmax predictions, number of labelled positions."""
    flat, y = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX)
    mask = y != IGNORE_INDEX
    correct = (flat.argmax(-1) == y)[mask].sum()
    return loss, correct, mask.sum()


@torch.no_grad()
def evaluate(model, data: TaskData, cfg: TrainConfig, info: DistInfo, autocast) -> dict[str, float]:
    model.eval()
    tot_loss, tot_correct, tot_n, batches = 0.0, 0, 0, 0
    size = max(1, cfg.run.batch_size // cfg.optim.grad_accum)
    for inputs, labels in data.eval_batches(size, max_batches=8, seed=cfg.run.seed):
        with autocast():
            logits, _ = model(inputs.to(info.device))
        loss, correct, n = loss_and_accuracy(logits, labels.to(info.device))
        tot_loss, tot_correct, tot_n, batches = tot_loss + loss.item(), tot_correct + int(correct), tot_n + int(n), batches + 1
    model.train()
    out = {"val_loss": tot_loss / max(batches, 1)}
    if data.kind == "mqar":
        out["val_accuracy"] = tot_correct / max(tot_n, 1)
    else:
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    return out


class Logger:
    """Rank-0 metrics: JSONL and CSV (and TensorBoard when asked and installed), plus a progress line."""

    def __init__(self, out: Path, cfg: TrainConfig, info: DistInfo, resume: bool):
        self.on = info.is_main
        self.progress = cfg.run.progress and self.on and sys.stderr.isatty()  # no \r-bars in log files
        self.total = cfg.run.steps
        self.t0 = time.perf_counter()
        self.tb = None
        if not self.on:
            return
        mode = "a" if resume else "w"
        self.jsonl = open(out / "metrics.jsonl", mode)
        self.csv_file = open(out / "metrics.csv", mode, newline="")
        self.csv = csv.writer(self.csv_file)
        if not resume:
            self.csv.writerow(["step", "split", "loss", "accuracy", "lr", "tokens_per_s"])
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                print("tensorboard is not installed: skipping TensorBoard logs", file=sys.stderr)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.on:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        acc = metrics.get("accuracy", metrics.get("val_accuracy", ""))
        self.csv.writerow([step, split, metrics.get("loss", metrics.get("val_loss")), acc, metrics.get("lr", ""),
                           metrics.get("tokens_per_s", "")])
        self.csv_file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def bar(self, step: int, loss: float, tok_s: float, start_step: int) -> None:
        if not self.progress:
            return
        done = step - start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
              f"{tok_s:,.0f} tok/s ETA {eta:5.0f}s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress:
            print(file=sys.stderr)
        if self.on:
            self.jsonl.close()
            self.csv_file.close()
            if self.tb is not None:
                self.tb.close()


# ----------------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    train_losses: list[float]  # one per optimizer step (this run's steps only)
    final_eval: dict[str, float]
    tokens_per_s: float
    skipped_steps: int = 0  # steps whose loss or gradients were not finite: no update was applied


def _differing_keys(a: dict, b: dict) -> list[str]:
    """Keys (``memory.x`` for nested ones) whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{k}.{n}" for n in sorted(set(x) | set(y)) if x.get(n) != y.get(n)]
        elif x != y:
            out.append(k)
    return out


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.task``; returns the per-step losses and the final evaluation.

    ``resume=True`` continues from ``cfg.run.out_dir/checkpoint`` (the architecture is taken from the checkpoint,
    which must match cfg.model) and reproduces the losses of an uninterrupted run exactly on CPU.
    """
    info = init_distributed(cfg.run.device)
    try:
        return _train(cfg, info, resume)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool) -> TrainResult:
    run, opt_cfg = cfg.run, cfg.optim
    out = Path(run.out_dir)
    ckpt = out / "checkpoint"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    micro = run.batch_size // opt_cfg.grad_accum  # global micro-batch
    if micro % info.world_size:
        raise ValueError(f"the micro-batch ({micro} = run.batch_size / optim.grad_accum) must divide evenly over "
                         f"{info.world_size} ranks")
    per_rank = micro // info.world_size

    torch.manual_seed(run.seed)
    if info.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    use_bf16 = run.precision == "bfloat16" or (run.precision == "auto" and info.device.type == "cuda")

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # the architecture comes from the checkpoint when resuming
    if resume:
        saved = read_trainer_state(ckpt)["config"]
        diff = [] if saved is None else _differing_keys(saved_model_config(saved.get("model") or {}),
                                                        cfg.model.to_dict())
        if diff:
            raise ValueError(f"--resume: the checkpoint in {ckpt} was trained with a different model config "
                             f"(model.{', model.'.join(diff)}); pass the checkpoint's values as overrides")
    data = TaskData(cfg)
    model = MnemosLM(cfg.model).to(info.device)
    if resume:
        load_model_weights(ckpt, model)
    wrapped = wrap_model(model, info, run.parallel)
    # the optimizer comes after wrapping: FSDP2 replaces the parameters by sharded ones
    optimizer = build_optimizer(model, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay,
                                betas=(opt_cfg.beta1, opt_cfg.beta2))
    scheduler = build_scheduler(optimizer, warmup=opt_cfg.warmup_steps, total=run.steps, min_ratio=opt_cfg.min_lr_ratio)
    full = StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)
    start_step, best = 0, None
    if resume:
        state = read_trainer_state(ckpt)
        set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, best = state["step"], state["best_metric"]
    fwd = torch.compile(wrapped) if run.compile else wrapped
    log = Logger(out, cfg, info, resume)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        n_params = model.num_parameters()
        print(f"mnemos {__version__}: {cfg.model.variant}, {n_params / 1e6:.2f}M parameters, {info.world_size} "
              f"process(es) on {info.device}, task {cfg.task.kind}, {run.steps} steps", file=sys.stderr)

    losses: list[float] = []
    skipped = skipped_in_a_row = 0
    final: dict[str, float] = {}
    tokens = 0
    t_start = time.perf_counter()
    step = start_step
    for step in range(start_step, run.steps):
        step_loss = torch.zeros((), device=info.device)
        for m in range(opt_cfg.grad_accum):
            inputs, labels = data.batch(step * opt_cfg.grad_accum + m, micro, run.seed)
            sl = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
            inputs, labels = inputs[sl].to(info.device), labels[sl].to(info.device)
            sync = m == opt_cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
            with (nullcontext() if sync else wrapped.no_sync()), autocast():
                logits, _ = fwd(inputs)
            loss, _, _ = loss_and_accuracy(logits, labels)
            (loss / opt_cfg.grad_accum).backward()
            step_loss += loss.detach() / opt_cfg.grad_accum
            tokens += inputs.numel() * info.world_size
        # a step whose loss or gradients overflowed (the test-time memory can blow up on an unlucky batch) is skipped,
        # as mixed-precision loss scaling does, rather than writing NaN into every weight; many in a row stop the run
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip if opt_cfg.grad_clip > 0
                                                   else float("inf"))
        if bool(torch.isfinite(grad_norm)):
            optimizer.step()
            skipped_in_a_row = 0
        else:
            skipped += 1
            skipped_in_a_row += 1
            if info.is_main:
                print(f"step {step + 1}: non-finite gradient norm, update skipped ({skipped} so far)", file=sys.stderr)
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(f"training diverged at step {step + 1}: {skipped_in_a_row} steps in a row "
                                         "with non-finite gradients")
        with warnings.catch_warnings():  # the schedule advances over a skipped step too; torch warns if step 1 was
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = all_reduce_mean(step_loss, info).item()
        losses.append(step_loss)  # NaN for a step whose loss overflowed (its update was skipped above)
        tok_s = tokens / (time.perf_counter() - t_start)
        log.bar(step + 1, step_loss, tok_s, start_step)
        if (step + 1) % run.log_every == 0:
            log.log(step + 1, "train", {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s})
        last = step + 1 == run.steps
        if (step + 1) % run.eval_every == 0 or last:
            metrics = final = evaluate(fwd, data, cfg, info, autocast)
            log.log(step + 1, "val", metrics)
            key = metrics.get("val_accuracy", -metrics["val_loss"])
            best = key if best is None else max(best, key)
        stop = run.stop_after > 0 and step + 1 - start_step >= run.stop_after
        if (run.save_every and (step + 1) % run.save_every == 0) or last or stop:
            # full (gathered) state dicts, keyed by parameter names: the same file whether saved by 1 process,
            # DDP or FSDP, and loadable by any of them (a collective under FSDP: every rank takes part)
            model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=full)
            if info.is_main:
                save_checkpoint(ckpt, model_sd, step=step + 1, optimizer=optim_sd, scheduler=scheduler,
                                best_metric=best, config=cfg.to_dict())
            barrier(info)
        if stop:
            break
    log.close()
    tok_s = tokens / max(time.perf_counter() - t_start, 1e-9)
    if info.is_main and losses:
        _write_curve(out, start_step, losses)
    return TrainResult(out, start_step + len(losses), losses, final, tok_s, skipped)


def _write_curve(out: Path, start: int, losses: list[float]) -> None:
    """loss_curve.png (when matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_curve.png (pip install 'mnemos[plots]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(start + 1, start + len(losses) + 1), losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png")
    plt.close(fig)
