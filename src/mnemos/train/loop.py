"""The training loop of ``mnemos train``, top to bottom: setup, data, model, optimizer, loop, eval, checkpoints.

Runs as one process or under ``torchrun --nproc_per_node N`` (DDP or FSDP2). ``run.batch_size`` is the global batch:
every rank draws the same global batch from a generator seeded by (seed, step) and takes its own slice, so N ranks
see exactly the data of one process and the loss matches it within float tolerance. The same rule makes resuming
bit-exact: the batch of step s depends only on (seed, s), never on how the run got to s.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict

from .. import __version__
from ..checkpoint import load_model_weights, read_trainer_state
from ..data import IGNORE_INDEX, BABILongConfig, ByteTokenizer, LMDataConfig, MQARConfig, mqar_recall_metrics
from ..data.niah import make_niah_sample
from ..layers import NeuralMemory
from ..models import MnemosConfig, MnemosLM, saved_model_config
from ..models.cache import Cache
from ..models.config import INIT_ONLY_FIELDS
from .checkpoint import save_checkpoint, set_rng_state
from .config import ANSWER_EXTRA_TOKENS, ANSWER_KINDS, TrainConfig, answer_task_max_answer
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown, wrap_model
from .optim import build_optimizer, build_scheduler

# consecutive steps with non-finite gradients (each skipped) after which training stops as diverged
MAX_SKIPPED_IN_A_ROW = 10
_BYTES = ByteTokenizer()


# ----------------------------------------------------------------------------------------------------------------------
# data: a task is a function (step, split) -> (inputs [B, T], labels [B, T]) that depends on nothing else


class TaskData:
    """Batches of the configured task. ``batch(index, n, generator_seed)`` is a pure function of its arguments: ``n``
    documents of ``task.doc_len`` tokens (``task.seq_len`` unless ``task.doc_windows > 1``), inputs and labels.

    A document is one MQAR / niah / babilong example of ``doc_len`` tokens, or (``kind="lm"``) the ``doc_len + 1``
    tokens of the corpus at a uniform random start. With one window per document a batch is the batch of a run
    without documents, token for token; :func:`window_of` cuts the window a step trains on."""

    def __init__(self, cfg: TrainConfig):
        t, seed = cfg.task, cfg.run.seed
        self.kind = t.kind
        if t.kind == "mqar":
            common = dict(vocab_size=t.vocab_size, seq_len=t.doc_len, num_kv_pairs=t.num_kv_pairs, power_a=t.power_a,
                          noise=t.noise)
            self.train = MQARConfig(num_examples=t.train_examples, **common).build(seed)
            self.val = MQARConfig(num_examples=t.eval_examples, **common).build(seed + 1_000_003)
        elif t.kind in ANSWER_KINDS:
            # an example of the whole document: the prompt fills the windows before the answer
            self.task = t if t.doc_windows == 1 else dataclasses.replace(t, seq_len=t.doc_len, doc_windows=1)
            self.seed, self.train_examples = seed, t.train_examples
            self.val = _stack([answer_example(self.task, seed + 1_000_003, i) for i in range(t.eval_examples)])
        else:
            try:
                self.lm = LMDataConfig(seq_len=t.doc_len, paths=t.paths, val_fraction=t.val_fraction,
                                       documents=t.pack_documents).build(seed)
            except ValueError as e:  # the corpus is shorter than one document: say which keys set its length
                if t.doc_windows == 1:
                    raise
                raise ValueError(f"task.seq_len * task.doc_windows = {t.doc_len} tokens, the document length: {e}"
                                 ) from None

    def batch(self, step: int, size: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if self.kind == "mqar":
            inputs, labels = self.train if split == "train" else self.val
            idx = torch.randint(0, inputs.shape[0], (size,), generator=g)
            return inputs[idx], labels[idx]
        if self.kind in ANSWER_KINDS:
            if split != "train":
                raise ValueError(f"task.kind={self.kind}: val batches come from eval_batches")
            idx = torch.randint(0, self.train_examples, (size,), generator=g)
            return _stack([answer_example(self.task, self.seed, int(i)) for i in idx])
        tokens = self.lm.train if split == "train" else self.lm.val  # [N] int64
        at = self._lm_windows(g, size, tokens.numel())
        windows = tokens[at]  # [B, T + 1]
        labels = windows[:, 1:]
        docs = self.lm.train_docs if split == "train" else self.lm.val_docs
        if docs is not None:  # packed documents: a target that starts the next document is not scored
            d = docs[at]
            labels = labels.masked_fill(d[:, 1:] != d[:, :-1], IGNORE_INDEX)
        return windows[:, :-1], labels

    def document_ids(self, step: int, size: int, seed: int, split: str = "train") -> torch.Tensor | None:
        """``[size, T]``: the document of each input token of :meth:`batch`'s windows (the same arguments), or None
        when documents are not packed (``task.pack_documents``)."""
        docs = None if self.kind != "lm" else self.lm.train_docs if split == "train" else self.lm.val_docs
        if docs is None:
            return None
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return docs[self._lm_windows(g, size, docs.numel())][:, :-1]

    def _lm_windows(self, g: torch.Generator, size: int, n: int) -> torch.Tensor:
        """``[size, T + 1]`` token indices of windows at uniform random starts (one draw of ``g``)."""
        T = self.lm.seq_len
        starts = torch.randint(0, n - T, (size,), generator=g)  # [B]
        return starts[:, None] + torch.arange(T + 1)

    def eval_batches(self, size: int, max_batches: int, seed: int):
        """MQAR, niah, babilong: the whole val set (``task.eval_examples``) in order, ``size`` per batch; LM:
        ``max_batches`` random documents of the val split. Each document whole (one forward over all its windows)."""
        if self.kind != "lm":
            inputs, labels = self.val
            for i in range(0, inputs.shape[0], size):
                yield inputs[i : i + size], labels[i : i + size], None
        else:
            for i in range(max_batches):
                yield (*self.batch(i, size, seed + 7, split="val"), self.document_ids(i, size, seed + 7, split="val"))


def window_of(step: int, windows: int, span: int = 1) -> tuple[int, int]:
    """``(document, first window)`` of a step under truncated BPTT, each step reading ``span`` consecutive windows
    (``run.carry_grad_windows``) of documents of ``windows`` windows: steps ``d * windows / span ... (d + 1) *
    windows / span - 1`` read the windows of the batch of documents ``d`` in order (a pure function of the step, so
    resuming finds its place)."""
    doc, group = divmod(step, windows // span)
    return doc, group * span


def carried_forward(fwd, model: MnemosLM, inputs: torch.Tensor, state: Cache | None, *, detach: bool = True
                    ) -> tuple[torch.Tensor, Cache]:
    """Logits of one window and the state after it: ``state`` None starts the window's streams from a fresh state
    (a new document). ``detach``: the state returned is cut from the graph (:meth:`Cache.detach`), so the next
    window's gradient stops at its start; else the next window's loss backpropagates through it into this window's
    writes (a gradient span of several windows, ``run.carry_grad_windows``)."""
    if state is None:
        state = model.init_cache(inputs.shape[0], inputs.device)
    logits, state = fwd(inputs, state)
    return logits, state.detach() if detach else state


def answer_example(task, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example ``index`` of a ``niah`` / ``babilong`` task's split ``seed``: ``(inputs [T], labels [T])``, T =
    ``task.seq_len``, a pure function of its arguments.

    The sequence is the generator's prompt (byte tokens; needle depth uniform in [0, 1] for niah) cut so that
    ``" " + answer + "."`` fits after it for the longest answer of the task, then those answer tokens, then pad
    tokens up to T + 1. Inputs are its first T tokens and labels the next ones, ``IGNORE_INDEX`` except where the
    next token is one of the answer tokens: the loss and the accuracy see the answer only. The "." closes the answer
    so that a greedy decode of it is what :func:`mnemos.data.exact_match` reads."""
    prompt_len = task.seq_len + 1 - answer_task_max_answer(task) - ANSWER_EXTRA_TOKENS
    if task.kind == "niah":
        rng = np.random.default_rng((seed, index, 0x5EED))
        sample = make_niah_sample(task.niah_kind, prompt_len, float(rng.random()), rng)
    else:
        sample = BABILongConfig(task=task.babilong_qa, lengths=(prompt_len,), samples_per_length=1).build(
            seed * 1_000_003 + index)[0]
    answer = _BYTES.encode_tensor(" " + sample.answer + ".")
    pad = torch.full((task.seq_len + 1 - prompt_len - answer.numel(),), _BYTES.pad_id, dtype=torch.int64)
    seq = torch.cat([sample.input_ids, answer, pad])  # [T + 1]
    labels = torch.full((task.seq_len,), IGNORE_INDEX, dtype=torch.int64)
    at = slice(prompt_len - 1, prompt_len - 1 + answer.numel())
    labels[at] = seq[1:][at]
    return seq[:-1], labels


def _stack(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in examples]), torch.stack([y for _, y in examples])


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor, *, empty_ok: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled positions, number of correct argmax predictions, number of labelled positions.
    ``empty_ok``: a batch without labelled positions (a window of a document before its queries) has loss 0 and zero
    gradients instead of NaN (the mean is then a sum over ``max(n, 1)``, equal up to rounding)."""
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    mask = y != IGNORE_INDEX
    if flat.device.type == "cpu":
        # the labelled rows alone (an MQAR batch labels one position in eight or fewer): the softmax, its backward
        # and the argmax shrink with them (35 -> 7 ms a step at (256, 32)). Not on CUDA, where the selection's
        # size would cost a host sync every step.
        keep = mask.nonzero().squeeze(1)
        flat, y = flat.index_select(0, keep), y.index_select(0, keep)
        mask = mask.index_select(0, keep)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # bfloat16 / float16 logits: the softmax in float32
    if empty_ok:
        loss = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX, reduction="sum") / mask.sum().clamp(min=1)
    else:
        loss = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX)
    correct = (flat.argmax(-1) == y)[mask].sum()
    return loss, correct, mask.sum()


def answer_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """Teacher-forced exact match of ``niah`` / ``babilong`` answers: ``pred`` and ``labels`` ``[N, T]``;
    ``val_accuracy`` is the share of examples whose every labelled token is the argmax, ``val_token_accuracy`` the
    share of labelled tokens."""
    mask = labels != IGNORE_INDEX
    right = (pred == labels) | ~mask
    return {"val_accuracy": right.all(-1).float().mean().item(),
            "val_token_accuracy": ((pred == labels) & mask).sum().item() / max(int(mask.sum()), 1),
            "val_examples": labels.shape[0]}


def eval_reach(cfg: TrainConfig) -> int:
    """Where MQAR evals split near from far: ``model.n_layers * (model.window - 1)``, the reach of a stack of sliding
    windows of that size (nothing further back reaches a query through attention alone). The same split for every
    variant, windowed or not, so that near and far accuracies compare across variants."""
    return cfg.model.n_layers * (cfg.model.window - 1)


@torch.no_grad()
def validate(model, data: TaskData, cfg: TrainConfig, info: DistInfo, autocast) -> dict[str, float]:
    """Validation metrics. niah / babilong score every val example: ``val_loss`` (per answer token), ``val_accuracy``
    (every answer token right, teacher-forced), ``val_token_accuracy``, ``val_examples``. MQAR scores every one of
    the ``task.eval_examples`` val examples: ``val_loss``,
    ``val_accuracy``, the near / far split at :func:`eval_reach`, the context-value rate beside the 1/K level and
    chance (:func:`mnemos.data.mqar_recall_metrics`), and the counts ``val_n`` (queries) and ``val_examples``; with
    ``task.doc_windows`` k > 1 also ``val_window{w}_accuracy`` / ``val_window{w}_n`` for w = 1 .. k (the queries in
    each ``task.seq_len`` window of the whole-document read; NaN for a window without any). LM:
    ``val_loss`` and ``val_ppl`` over 8 batches of random val windows."""
    model.eval()
    loss_sum, n_sum, preds = 0.0, 0, []
    size = max(1, cfg.run.batch_size // cfg.optim.grad_accum)
    for inputs, labels, docs in data.eval_batches(size, max_batches=8, seed=cfg.run.seed):
        with autocast():
            logits, _ = model(inputs.to(info.device)) if docs is None else \
                model(inputs.to(info.device), document_ids=docs.to(info.device))
        loss, _, n = loss_and_accuracy(logits, labels.to(info.device))
        loss_sum, n_sum = loss_sum + loss.item() * int(n), n_sum + int(n)
        if data.kind != "lm":
            preds.append(logits.argmax(-1).cpu())
    model.train()
    out = {"val_loss": loss_sum / max(n_sum, 1)}
    if data.kind == "lm":
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
        return out
    if data.kind in ANSWER_KINDS:
        return {**out, **answer_accuracy(torch.cat(preds), data.val[1])}
    inputs, labels = data.val
    m = mqar_recall_metrics(torch.cat(preds), inputs, labels, cfg.task.num_kv_pairs, eval_reach(cfg),
                            vocab_size=cfg.task.vocab_size)
    for key in ("accuracy", "near_accuracy", "far_accuracy", "context_value_rate", "far_context_value_rate",
                "any_value_level", "chance", "n", "n_near", "n_far", "reach"):
        out[f"val_{key}"] = m[key]
    out["val_examples"] = inputs.shape[0]
    W = cfg.task.doc_windows
    if W > 1:  # documents of several windows: accuracy of the queries in each window (the first holds the pairs)
        correct, scored = torch.cat(preds) == labels, labels != IGNORE_INDEX
        for w in range(W):
            span = slice(w * cfg.task.seq_len, (w + 1) * cfg.task.seq_len)
            n = int(scored[:, span].sum())
            out[f"val_window{w + 1}_accuracy"] = float(correct[:, span][scored[:, span]].float().mean()) if n \
                else float("nan")
            out[f"val_window{w + 1}_n"] = n
    return out


def progress_every(run) -> int:
    """Steps between the plain progress lines printed when stderr is not a terminal: about 20 lines a run, at steps
    that are logged (multiples of ``run.log_every``), so each line can show the memory statistics of its step."""
    return run.log_every * max(1, run.steps // (20 * run.log_every))


class Logger:
    """Rank-0 metrics: JSONL and CSV (and TensorBoard when asked and installed), plus progress on stderr (when
    ``run.progress``): a \\r-bar on a terminal, else one plain line every :func:`progress_every` steps, so a run piped
    to a file shows how it goes; and one line per evaluation in both cases."""

    def __init__(self, out: Path, cfg: TrainConfig, info: DistInfo, resume: bool):
        self.on = info.is_main
        self.progress = cfg.run.progress and self.on
        self.tty = self.progress and sys.stderr.isatty()  # no \r-bars in log files
        self.every = progress_every(cfg.run)
        self.total = cfg.run.steps
        self.t0 = time.perf_counter()
        self.bar_open = False
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

    def bar(self, step: int, loss: float, tok_s: float, start_step: int, note: str = "") -> None:
        """Progress after ``step``; ``note`` (e.g. the memory's health) is appended to the line."""
        if not self.progress:
            return
        done = step - start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        text = f"{step}/{self.total} loss {loss:.4f} {tok_s:,.0f} tok/s ETA {eta:.0f}s{note}"
        if not self.tty:
            if step % self.every == 0 or step == self.total:
                print(f"step {text}", file=sys.stderr, flush=True)
            return
        width = 24
        filled = int(width * step / self.total)
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K", end="", file=sys.stderr, flush=True)
        self.bar_open = True

    def eval_line(self, step: int, metrics: dict[str, float]) -> None:
        """One line with an evaluation's results (on a terminal it ends the bar's line; the bar resumes below)."""
        if not self.progress:
            return
        m = metrics
        if "val_token_accuracy" in m:
            text = (f"val_loss {m['val_loss']:.4f} val_acc {m['val_accuracy']:.3f} (answer tokens "
                    f"{m['val_token_accuracy']:.3f}) on {m['val_examples']} examples")
        elif "val_accuracy" in m:
            text = (f"val_loss {m['val_loss']:.4f} val_acc {m['val_accuracy']:.3f} near {m['val_near_accuracy']:.3f} "
                    f"far {m['val_far_accuracy']:.3f} (reach {m['val_reach']}) ctx-val "
                    f"{m['val_context_value_rate']:.3f} (1/K {m['val_any_value_level']:.3f}) on {m['val_examples']} "
                    "examples")
        else:
            text = f"val_loss {m['val_loss']:.4f} val_ppl {m['val_ppl']:.2f}"
        end_bar = "\n" if self.bar_open else ""
        print(f"{end_bar}step {step}/{self.total} eval: {text}", file=sys.stderr, flush=True)
        self.bar_open = False

    def close(self) -> None:
        if self.bar_open:
            print(file=sys.stderr)
            self.bar_open = False
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
    stopped_at_accuracy: bool = False  # it stopped early: an eval reached run.stop_at_accuracy (step < run.steps)


def _resolved_model_config(saved: dict) -> dict:
    """A checkpoint's model config with every key it lacks filled in: keys added since it was written take the value
    that reproduces it (``saved_model_config``), the rest their defaults, so that only real differences count (a
    config saved before, say, ``memory.rule`` existed resumes). A dict the config cannot read comes back as it is."""
    completed = saved_model_config(saved)
    try:
        return MnemosConfig.from_dict(completed).to_dict()
    except (TypeError, ValueError):
        return completed


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
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _train(cfg, info, resume)
    finally:  # _train switches deterministic algorithms on for CPU runs: the caller's process gets its setting back
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        shutdown(info)


def _init_checkpoint(path: str) -> Path:
    """``run.init_from``: a checkpoint directory, or a run directory holding one (``checkpoint/``)."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        if (cand / "trainer.pt").is_file():
            return cand
    raise ValueError(f"run.init_from: no checkpoint at {path!r} (expected a checkpoint directory with trainer.pt, or "
                     "a run directory holding checkpoint/)")


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
    # documents of one window carry nothing: their steps are the plain ones (a forward from a fresh cache would
    # round differently from the cache-less forward of training)
    windows, span = cfg.task.doc_windows, run.carry_grad_windows
    groups = windows // span  # steps per batch of documents
    carry = run.carry_state and windows > 1
    if carry and info.world_size > 1:
        raise ValueError(f"run.carry_state=true runs in one process for now, not under torchrun ({info.world_size} "
                         "processes: each rank's carried state would have to be checkpointed); set "
                         "run.carry_state=false")

    torch.manual_seed(run.seed)
    if info.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    use_bf16 = run.precision == "bfloat16" or (run.precision == "auto" and info.device.type == "cuda")

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # the architecture comes from the checkpoint when resuming (or starting from one: run.init_from)
    init = None if resume or not run.init_from else _init_checkpoint(run.init_from)
    source, what = (ckpt, "--resume") if resume else (init, "run.init_from")
    if source is not None:
        saved = read_trainer_state(source)["config"]
        diff = [] if saved is None else _differing_keys(_resolved_model_config(saved.get("model") or {}),
                                                        cfg.model.to_dict())
        # only what the variant reads (a hybrid stack: any of its blocks), and not what only sets an initialisation
        # (the checkpoint's weights win)
        diff = [k for k in diff if cfg.model.reads_field(k) and k not in INIT_ONLY_FIELDS]
        if diff:
            raise ValueError(f"{what}: the checkpoint in {source} was trained with a different model config "
                             f"(model.{', model.'.join(diff)}); pass the checkpoint's values as overrides")
    data = TaskData(cfg)
    model = MnemosLM(cfg.model).to(info.device)
    if resume:
        load_model_weights(ckpt, model)
    elif init is not None:
        load_model_weights(init, model)  # fine-tuning: the weights only (a fresh optimizer, schedule and step count)
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
        if not state["optimizer"].get("state"):  # saved before any update: loading initialised a state, drop it
            optimizer.state.clear()
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, best = state["step"], state["best_metric"]
    # truncated BPTT: the state each micro-batch's streams carry into their next window (None: a fresh state)
    states: list[Cache | None] = [None] * opt_cfg.grad_accum
    if resume and carry and start_step % groups:
        with autocast():
            states = _load_carried(state["extra"], model, per_rank, info.device, opt_cfg.grad_accum, ckpt)
    fwd = torch.compile(wrapped) if run.compile else wrapped
    log = Logger(out, cfg, info, resume)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        n_params = model.num_parameters()
        print(f"mnemos {__version__}: {cfg.model.variant}, {n_params / 1e6:.2f}M parameters, {info.world_size} "
              f"process(es) on {info.device}, task {cfg.task.kind}, {run.steps} steps", file=sys.stderr)
        notice = kernels_notice(model, info.device)
        if notice:
            print(notice, file=sys.stderr)

    losses: list[float] = []
    skipped = skipped_in_a_row = 0
    final: dict[str, float] = {}
    tokens = 0
    memory_layers = [layer for layer in model.modules() if isinstance(layer, NeuralMemory)]
    penalty = opt_cfg.write_penalty
    if penalty > 0:
        if not memory_layers:
            raise ValueError(f"optim.write_penalty={penalty:g} needs a model with a neural memory; "
                             f"{cfg.model.variant!r} has none")
        for layer in memory_layers:
            layer.track_writes = True
    note = ""  # the progress line's summary of the memory's health, from the last logged step
    good_schedule = scheduler.state_dict()  # the schedule as of the last applied update (a skipped step advances it)

    def save(at_step: int, extra: dict | None = None) -> None:
        # full (gathered) state dicts, keyed by parameter names: the same file whether saved by 1 process,
        # DDP or FSDP, and loadable by any of them (a collective under FSDP: every rank takes part)
        fresh = not optimizer.state  # no update applied yet (a document's label-free first windows)
        model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=full)
        if fresh:  # get_state_dict gave the optimizer a state (a zero-gradient step at lr 0: AdamW's step count 1),
            # which would shift every later update's bias correction: take it back, and save none
            optimizer.state.clear()
            optim_sd = dict(optim_sd, state={})
        if info.is_main:
            save_checkpoint(ckpt, model_sd, step=at_step, optimizer=optim_sd, scheduler=scheduler, best_metric=best,
                            config=cfg.to_dict(), extra=extra)
        barrier(info)

    t_start = time.perf_counter()
    step = start_step
    reached = False  # an eval reached run.stop_at_accuracy
    documents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the batches of the documents being read
    for step in range(start_step, run.steps):
        logged = (step + 1) % run.log_every == 0
        step_loss = torch.zeros((), device=info.device)
        doc, w0 = window_of(step, windows, span)
        if w0 == 0:  # new documents: every stream starts from a fresh state
            states, documents = [None] * opt_cfg.grad_accum, {}
        for m in range(opt_cfg.grad_accum):
            index = doc * opt_cfg.grad_accum + m
            if index not in documents:
                documents[index] = (*data.batch(index, micro, run.seed), data.document_ids(index, micro, run.seed))
        # a step whose windows hold no labelled position in any row (a recall document's context before its
        # question) has nothing to learn: its windows are read without a graph (carried on) or not at all, and no
        # update is made (no gradient, so AdamW moves no weight and no moment; the schedule still advances). Decided
        # on the whole batch, so every rank decides alike.
        labelled = windows == 1 or any(
            bool((documents[doc * opt_cfg.grad_accum + m][1][:, w0 * cfg.task.seq_len:(w0 + span) * cfg.task.seq_len]
                  != IGNORE_INDEX).any()) for m in range(opt_cfg.grad_accum))
        if not (labelled or carry):  # nothing is read: a logged step shows no memory statistics (not stale ones)
            _record_memory_stats(memory_layers, logged)
            _record_memory_stats(memory_layers, False)
        for m in range(opt_cfg.grad_accum if labelled or carry else 0):
            doc_inputs, doc_labels, doc_ids = documents[doc * opt_cfg.grad_accum + m]
            sl = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
            sync = m == opt_cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
            _record_memory_stats(memory_layers, logged and m == 0)  # a logged step's first micro-batch only
            parts, aux = [], None
            with (nullcontext() if sync else wrapped.no_sync()), autocast(), torch.set_grad_enabled(labelled):
                # the step's windows (one unless run.carry_grad_windows), the state carried between them with its
                # gradient and cut after the last one
                for w in range(w0, w0 + span):
                    at = slice(w * cfg.task.seq_len, (w + 1) * cfg.task.seq_len)
                    inputs, labels = doc_inputs[sl, at].to(info.device), doc_labels[sl, at].to(info.device)
                    if carry:
                        logits, states[m] = carried_forward(fwd, model, inputs, states[m], detach=w == w0 + span - 1)
                    elif doc_ids is None:
                        logits, _ = fwd(inputs)
                    else:  # packed documents: each from a fresh state
                        logits, _ = fwd(inputs, document_ids=doc_ids[sl, at].to(info.device))
                    # the mixers' own losses (MoM's load balancing; None for most): trained, not logged
                    a = model.aux_loss()
                    if penalty > 0:  # the write penalty: lambda x the mean write strength of the memories
                        w = penalty * torch.stack([torch.stack(m.write_strengths).mean() for m in memory_layers]).mean()
                        for m in memory_layers:
                            m.write_strengths.clear()
                        a = w if a is None else a + w
                    if a is not None:
                        aux = a if aux is None else aux + a
                    parts.append((logits, labels))
                    tokens += inputs.numel() * info.world_size
            _record_memory_stats(memory_layers, False)
            if not labelled:
                continue
            # the mean over the labelled positions of the step's windows (of the whole document when the span is it);
            # a window of a longer document may hold no labelled position (a recall example's context)
            logits, labels = parts[0] if span == 1 else (torch.cat([p[0] for p in parts], 1),
                                                         torch.cat([p[1] for p in parts], 1))
            loss, _, _ = loss_and_accuracy(logits, labels, empty_ok=True) if windows > 1 else \
                loss_and_accuracy(logits, labels)
            ((loss if aux is None else loss + aux / span) / opt_cfg.grad_accum).backward()
            step_loss += loss.detach() / opt_cfg.grad_accum
        step_loss = all_reduce_mean(step_loss, info).item()
        losses.append(step_loss)  # NaN for a step whose loss overflowed (its update is skipped below)
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
            states = [None] * opt_cfg.grad_accum  # the state overflowed too: the documents go on from a fresh one
            if info.is_main:
                print(f"step {step + 1}: non-finite gradient norm, update skipped ({skipped} so far)", file=sys.stderr)
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                # the skipped steps changed no weight and no optimizer state: the model IS the last good one. Save
                # it as of that step (its schedule too) with the loss curve, then stop.
                good = step + 1 - skipped_in_a_row
                scheduler.load_state_dict(good_schedule)
                for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                    group["lr"] = lr
                save(good, {"diverged_at_step": step + 1})
                log.close()
                if info.is_main:
                    _write_curve(out, start_step, losses)
                raise FloatingPointError(
                    f"training diverged at step {step + 1}: {skipped_in_a_row} steps in a row with non-finite "
                    f"gradients; the weights of step {good} (the last applied update) are saved in {ckpt}, the loss "
                    f"curve in {out / 'loss_curve.png'}")
        with warnings.catch_warnings():  # the schedule advances over a skipped step too; torch warns if step 1 was
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        if not skipped_in_a_row:
            good_schedule = scheduler.state_dict()
        optimizer.zero_grad(set_to_none=True)
        tok_s = tokens / (time.perf_counter() - t_start)
        if logged:
            mem = _memory_stats(memory_layers)
            log.log(step + 1, "train", {"loss": step_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s,
                                        "skipped_steps": skipped, **mem})
            note = _memory_note(mem, skipped)
        log.bar(step + 1, step_loss, tok_s, start_step, note)
        last = step + 1 == run.steps
        if (step + 1) % run.eval_every == 0 or last:
            metrics = final = validate(fwd, data, cfg, info, autocast)
            log.log(step + 1, "val", metrics)
            log.eval_line(step + 1, metrics)
            key = metrics.get("val_accuracy", -metrics["val_loss"])
            best = key if best is None else max(best, key)
            reached = 0 < run.stop_at_accuracy <= metrics.get("val_accuracy", -1.0)
            if reached and not last and info.is_main:
                print(f"step {step + 1}: val_accuracy {metrics['val_accuracy']:.4f} reached run.stop_at_accuracy "
                      f"{run.stop_at_accuracy:g}: stopping here", file=sys.stderr)
        stop = run.stop_after > 0 and step + 1 - start_step >= run.stop_after
        if (run.save_every and (step + 1) % run.save_every == 0) or last or stop or reached:
            # mid-document, the carried state goes with the checkpoint (the stream position is the step's)
            save(step + 1, {"carried_state": _carried_state_dict(states)} if carry and (step + 1) % groups else None)
        if stop or reached:
            break
    log.close()
    tok_s = tokens / max(time.perf_counter() - t_start, 1e-9)
    if info.is_main and losses:
        _write_curve(out, start_step, losses)
    return TrainResult(out, start_step + len(losses), losses, final, tok_s, skipped,
                       stopped_at_accuracy=reached and start_step + len(losses) < run.steps)


def _carried_state_dict(states: list[Cache | None]) -> dict[str, torch.Tensor]:
    """The carried states of the micro-batches as one flat dict, ``{m}.{key}`` (a fresh state: no keys)."""
    return {f"{m}.{k}": v.cpu() for m, st in enumerate(states) if st is not None for k, v in st.state_dict().items()}


def kernels_notice(model: torch.nn.Module, device: torch.device) -> str | None:
    """On CUDA, a line saying which memory layers miss the Triton kernels and why (None on the CPU, or when every
    layer takes them): such a layer trains on the chunked torch path, exact but several times slower."""
    if device.type != "cuda":
        return None
    reasons: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, NeuralMemory):
            reason = m.kernels_unsupported_reason(device)
            if reason is not None:
                reasons.setdefault(reason, []).append(name)
    if not reasons:
        return None
    parts = [f"{len(names)} memory layer(s): {reason}" for reason, names in reasons.items()]
    return "note: the chunked torch path, not the Triton kernels, runs " + "; ".join(parts)


def _load_carried(extra: dict, model: MnemosLM, batch: int, device, accum: int, ckpt: Path) -> list[Cache | None]:
    """The carried states of :func:`_carried_state_dict` back in caches made by ``model.init_cache``."""
    if "carried_state" not in extra:
        raise ValueError(f"--resume: {ckpt} stops in the middle of a document but holds no carried state (it was "
                         "saved without run.carry_state, or when the run diverged); resume with run.carry_state=false "
                         "or from an earlier run")
    flat, states = extra["carried_state"], []
    for m in range(accum):
        sd = {k[len(f"{m}."):]: v for k, v in flat.items() if k.startswith(f"{m}.")}
        cache = None
        if sd:
            cache = model.init_cache(batch, device)
            cache.load_state_dict(sd)
        states.append(cache)
    return states


def _record_memory_stats(layers: list[NeuralMemory], on: bool) -> None:
    """Switch the memory layers' health statistics on (cleared, to be filled by the next forward) or off."""
    for layer in layers:
        layer.record_stats = on
        if on:
            layer.reset_stats()


def _memory_stats(layers: list[NeuralMemory]) -> dict[str, float]:
    """``mem.{i}.{key}``: the statistics the i-th memory layer (in model order) recorded since they were switched on:
    over every call of the step's forward (MAC calls its memory once per segment)."""
    return {f"mem.{i}.{k}": float(v) for i, layer in enumerate(layers)
            for k, v in layer.merged_stats().items() if isinstance(v, (int, float))}


INNER_LOSS_TOLERANCE = 0.01  # values are unit vectors: a rise below 1% of that scale is noise at a near-zero loss


def inner_loss_rose(start: float, end: float) -> bool:
    """Whether a memory's associative loss rose over a sequence (``inner_loss_start`` -> ``inner_loss``) by more than
    :data:`INNER_LOSS_TOLERANCE`: the memory diverging inside the forward. A non-finite ``end`` counts as rising."""
    return not end - start <= INNER_LOSS_TOLERANCE


def _memory_note(mem: dict[str, float], skipped: int) -> str:
    """The progress line's summary: the largest per-token step of any layer, the mean share of reads the writes made,
    the layers whose inner loss rose over the sequence (the memory diverging inside the forward: the layer's output
    is normalised, so the outer loss stays finite and no step is skipped), and the skipped steps so far."""
    step_max = [v for k, v in mem.items() if k.endswith(".step_max")]
    write = [v for k, v in mem.items() if k.endswith(".write_fraction")]
    note = f" | mem step_max {max(step_max):.3g}" if step_max else ""
    note += f" write {sum(write) / len(write):.2f}" if write else ""
    rising = [(k[: -len(".inner_loss")], mem[k + "_start"], v) for k, v in mem.items()
              if k.endswith(".inner_loss") and k + "_start" in mem and inner_loss_rose(mem[k + "_start"], v)]
    if rising:
        note += " | INNER LOSS ROSE " + ", ".join(f"{name} {a:.3g}->{b:.3g}" for name, a, b in rising)
    return note + (f" | skipped {skipped}" if skipped else "")


def _write_curve(out: Path, start: int, losses: list[float]) -> tuple[list[int], list[float]]:
    """loss_curve.png (when matplotlib is installed): the train loss of the whole run. This invocation's steps
    ``start + 1, start + 2, ...`` come from ``losses``, one per step; a resumed run's earlier steps (``<= start``) are
    read back from its metrics.jsonl (metrics.csv when that is missing), at the steps they were logged (every
    ``run.log_every``). Returns the steps and losses it plots."""
    earlier = _logged_train_losses(out, start) if start else {}
    steps = [*earlier, *range(start + 1, start + len(losses) + 1)]
    values = [*earlier.values(), *losses]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss_curve.png (pip install 'mnemos[plots]')", file=sys.stderr)
        return steps, values
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, values, lw=1.2)
    if earlier:
        ax.axvline(start, color="grey", ls=":", lw=1, label=f"resumed at step {start} (before: logged steps)")
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if any(v > 0 for v in values):  # a run of label-free steps only (a document's first windows) has no log scale
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png")
    plt.close(fig)
    return steps, values


def _logged_train_losses(out: Path, until: int) -> dict[int, float]:
    """``{step: loss}`` of the train records at steps ``<= until`` in the run's metrics.jsonl (else metrics.csv), in
    step order; a step logged twice (by a run resumed from a checkpoint older than its last log) keeps its last
    record, and a line cut short by a kill is skipped."""
    rows: list[dict] = []
    if (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    elif (out / "metrics.csv").is_file():
        with open(out / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    found: dict[int, float] = {}
    for row in rows:
        try:
            step, loss = int(row["step"]), float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue
        if row.get("split") == "train" and step <= until:
            found[step] = loss
    return dict(sorted(found.items()))
