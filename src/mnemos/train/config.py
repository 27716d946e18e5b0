"""The run config of ``mnemos train``: nested typed dataclasses, read from YAML and dotted CLI overrides.

    model:  MnemosConfig   (which architecture; mnemos.models.config)
    task:   TaskConfig     (what to learn: MQAR recall or language modelling)
    optim:  OptimConfig    (AdamW, schedule, clipping, accumulation)
    run:    RunConfig      (steps, batch, device, precision, logging, checkpoints)

Every level rejects unknown keys by their dotted name and checks types and ranges, so a misspelt key is an error,
never a silent default. ``load_config(yaml_path, ["model.d_model=128", "optim.lr=1e-3"])`` merges overrides into the
file before validation; values are parsed as YAML scalars (``1e-3``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..models.config import ConfigTypeError, MnemosConfig, _ConfigBase, _yaml_problem, merge_overrides, read_yaml


@dataclass
class TaskConfig(_ConfigBase):
    """What the model learns. ``kind="mqar"``: multi-query associative recall (mnemos.data.MQARConfig), labels only at
    the queries; ``kind="lm"``: next-token prediction on the built-in corpus or ``paths``; ``kind="niah"`` (S-NIAH,
    ``niah_kind`` passkey or number) and ``kind="babilong"`` (``babilong_qa``): the benchmark suite's retrieval prompts
    (mnemos.data) followed by ``" " + answer + "."`` in ``seq_len`` byte tokens, labels only on those answer tokens.

    ``doc_windows > 1``: each example (LM: each span) is a document of ``seq_len * doc_windows`` tokens, trained one
    window of ``seq_len`` tokens per step, with the state carried across its windows when ``run.carry_state``
    (docs/TRAINING.md, "Long documents")."""

    _where = "task."

    kind: Literal["mqar", "lm", "niah", "babilong"] = "mqar"
    seq_len: int = 128
    # mqar
    vocab_size: int = 64  # MQAR vocabulary (keys in the lower half, values in the upper half)
    num_kv_pairs: int = 8
    power_a: float = 0.01
    noise: Literal["zoology", "disjoint"] = "zoology"  # noise as Zoology draws it, or kept off the keys (easier)
    train_examples: int = 20000
    eval_examples: int = 500
    # lm
    paths: tuple[str, ...] = ()  # user text files or directories; empty = the built-in corpus
    val_fraction: float = 0.05
    # packed documents: a window holds the corpus' documents (each file of paths; each paragraph of the built-in
    # corpus) as they come, each read from a fresh state (MnemosLM's document_ids), no target across a boundary
    pack_documents: bool = False
    # niah, babilong (train_examples / eval_examples: how many distinct prompts each split draws from)
    niah_kind: Literal["passkey", "number"] = "passkey"
    babilong_qa: Literal["qa1", "qa2", "qa3"] = "qa1"
    # documents of doc_windows * seq_len tokens, streamed one window of seq_len tokens per step (run.carry_state)
    doc_windows: int = 1

    @property
    def doc_len(self) -> int:
        """Tokens of one training document: ``seq_len * doc_windows`` (one MQAR / niah / babilong example, or one LM
        span)."""
        return self.seq_len * self.doc_windows

    def __post_init__(self):
        if isinstance(self.paths, list):
            self.paths = tuple(self.paths)
        self._check_types()
        if self.kind == "lm":  # before anything is written to run.out_dir
            for i, path in enumerate(self.paths):
                if not Path(path).exists():
                    raise FileNotFoundError(f"task.paths[{i}]: {path!r} does not exist")
        for name in ("seq_len", "num_kv_pairs", "train_examples", "eval_examples", "doc_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"task.val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.pack_documents and self.kind != "lm":
            raise ValueError(f"task.pack_documents=true packs the documents of a text corpus: it needs task.kind=lm, "
                             f"got task.kind={self.kind!r}")
        if self.pack_documents and self.doc_windows > 1:
            raise ValueError("task.pack_documents=true resets the state at every document inside a window; it does not "
                             "combine with task.doc_windows > 1 (a window streamed on from the one before): set "
                             "task.doc_windows=1")
        if self.kind == "mqar" and self.noise == "zoology" and self.doc_windows > 1 \
                and self.vocab_size <= self.doc_len:  # one window: MQARConfig says it
            raise ValueError(f"task.noise=zoology needs task.vocab_size > task.seq_len * task.doc_windows (the "
                             f"document length, as Zoology's generator asserts): got task.vocab_size="
                             f"{self.vocab_size}, {self.seq_len} * {self.doc_windows} = {self.doc_len} tokens (raise "
                             "task.vocab_size or use task.noise=disjoint)")
        if self.kind in ANSWER_KINDS and self.doc_len < answer_task_min_len(self):
            what = f"niah_kind={self.niah_kind}" if self.kind == "niah" else f"babilong_qa={self.babilong_qa}"
            key, got = ("task.seq_len", self.seq_len) if self.doc_windows == 1 else \
                ("task.seq_len * task.doc_windows", f"{self.seq_len} * {self.doc_windows} = {self.doc_len}")
            raise ValueError(f"{key} must be >= {answer_task_min_len(self)} for task.kind={self.kind} ({what}: "
                             f"the shortest prompt plus the answer), got {got}")


# task kinds whose examples are a prompt + " " + answer + ".", labelled only on the answer (byte tokenizer)
ANSWER_KINDS = ("niah", "babilong")
ANSWER_EXTRA_TOKENS = 2  # the " " before the answer and the "." after it


def answer_task_max_answer(task: TaskConfig) -> int:
    """The longest answer (in byte tokens) a ``niah`` / ``babilong`` task asks for."""
    if task.kind == "niah":
        from ..data.niah import _MAX_VALUE_CHARS

        return _MAX_VALUE_CHARS[task.niah_kind]
    from ..data.babilong import LOCATIONS

    return max(map(len, LOCATIONS))


def answer_task_min_len(task: TaskConfig) -> int:
    """The shortest ``task.seq_len`` that holds the shortest prompt of a ``niah`` / ``babilong`` task and its answer."""
    if task.kind == "niah":
        from ..data.niah import min_length

        prompt = min_length(task.niah_kind)
    else:
        from ..data import BABILongConfig
        from ..data.babilong import min_length

        prompt = min_length(BABILongConfig(task=task.babilong_qa, lengths=(10**6,)).resolved_num_facts)
    # inputs are seq_len tokens, their labels the next ones: prompt + answer tokens = seq_len + 1
    return prompt + answer_task_max_answer(task) + ANSWER_EXTRA_TOKENS - 1


@dataclass
class OptimConfig(_ConfigBase):
    _where = "optim."

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    # lambda of the memory's write penalty: adds lambda x the mean over the model's neural memories and tokens of each
    # token's write strength theta / its bound (in [0, 1]) to the training loss, so that writes nothing is asked
    # about get cheaper to skip (docs/TRAINING.md, "The write penalty"); 0: none
    write_penalty: float = 0.0

    def __post_init__(self):
        self._check_types()
        if not (math.isfinite(self.write_penalty) and self.write_penalty >= 0):
            raise ValueError(f"optim.write_penalty must be a finite number >= 0, got {self.write_penalty}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class RunConfig(_ConfigBase):
    _where = "run."

    steps: int = 300
    batch_size: int = 32  # global batch per optimizer step (split over grad_accum micro-batches and ranks)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    compile: bool = False  # torch.compile the model
    parallel: Literal["ddp", "fsdp", "none"] = "ddp"  # used under torchrun only
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 0  # 0: save at the end only
    stop_after: int = 0  # stop (and save) after this many steps of this invocation; 0 = run to the end.
    # For time-limited jobs: launch again with --resume to continue where it stopped.
    # stop (and save) at the first eval whose val_accuracy reaches this; 0 = never. Zoology stops its MQAR runs at
    # 0.99 (its TrainConfig.early_stopping_threshold); tasks with an accuracy only (mqar, niah, babilong)
    stop_at_accuracy: float = 0.0
    out_dir: str = "runs/default"
    progress: bool = True
    tensorboard: bool = False  # write TensorBoard events when the package is installed
    # truncated BPTT: each batch row reads its document window by window (task.doc_windows windows of task.seq_len
    # tokens, one window per step), the model's state carried from window to window, detached (docs/TRAINING.md)
    carry_state: bool = False
    # the gradient's span under run.carry_state: each step reads this many consecutive windows of its documents, the
    # state carried between them with its gradient (TBPTT(k, k)), detached only at the step's start; must divide
    # task.doc_windows (= task.doc_windows: the gradient of the whole document, read window by window)
    carry_grad_windows: int = 1
    # start from the weights of a saved checkpoint (a run's checkpoint directory, or the run directory holding one):
    # fine-tuning, with a fresh optimizer, schedule and step count; the model config must be the checkpoint's (what
    # the variant reads). Ignored by --resume, which continues from run.out_dir's own checkpoint. "": no
    init_from: str = ""

    def __post_init__(self):
        self._check_types()
        for name in ("steps", "batch_size", "eval_every", "log_every", "carry_grad_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "stop_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.stop_at_accuracy <= 1.0:
            raise ValueError(f"run.stop_at_accuracy must be in [0, 1] (0: never stop early), got {self.stop_at_accuracy}")


@dataclass
class TrainConfig:
    model: MnemosConfig = field(default_factory=lambda: MnemosConfig(variant="mag", vocab_size=64))
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.task.kind == "mqar" and self.model.vocab_size < self.task.vocab_size:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) must be >= task.vocab_size ({self.task.vocab_size})"
            )
        if self.task.kind in ("lm", *ANSWER_KINDS) and self.model.vocab_size < 259:
            raise ValueError(f"task.kind={self.task.kind!r} uses the byte tokenizer (259 ids): model.vocab_size must be "
                             f">= 259, got {self.model.vocab_size}")
        if self.run.carry_state and self.run.compile:
            raise ValueError("run.carry_state=true does not support run.compile=true (the carried state changes shape "
                             "from window to window and would recompile the model); set run.compile=false")
        k = self.run.carry_grad_windows
        if k > 1 and not self.run.carry_state:
            raise ValueError(f"run.carry_grad_windows={k} spans the carried state: it needs run.carry_state=true (or "
                             "set run.carry_grad_windows=1)")
        if self.task.doc_windows % k:
            raise ValueError(f"run.carry_grad_windows ({k}) must divide task.doc_windows ({self.task.doc_windows}): "
                             "each step reads that many windows of a document")
        if self.run.stop_at_accuracy > 0 and self.task.kind == "lm":
            raise ValueError("run.stop_at_accuracy needs a task scored by accuracy (mqar, niah, babilong); task.kind='lm' "
                             "has a loss only: set run.stop_at_accuracy=0")
        if self.run.batch_size % self.optim.grad_accum:
            raise ValueError(
                f"run.batch_size ({self.run.batch_size}) must be divisible by optim.grad_accum ({self.optim.grad_accum})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in ("model", "task", "optim", "run")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigTypeError(f"a run config must be a mapping of sections, got {type(d).__name__}")
        parts = {"model": MnemosConfig, "task": TaskConfig, "optim": OptimConfig, "run": RunConfig}
        unknown = sorted(set(d) - set(parts), key=str)
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; valid sections: {list(parts)}")
        for k in d:
            if d[k] is not None and not isinstance(d[k], dict):
                raise ConfigTypeError(f"{k} must be a section (a mapping of {k}.* keys), got {d[k]!r} "
                                      f"({type(d[k]).__name__})")
        return cls(**{k: parts[k].from_dict(d[k] or {}) for k in d})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from an optional YAML file plus dotted overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        if not p.is_file():
            raise ValueError(f"config file {p} is not a file")
        try:
            loaded = read_yaml(p.read_text())
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {p} is not text: {e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        d = loaded or {}
    return TrainConfig.from_dict(merge_overrides(d, overrides or []))


__all__ = ["TrainConfig", "TaskConfig", "OptimConfig", "RunConfig", "load_config", "merge_overrides"]
