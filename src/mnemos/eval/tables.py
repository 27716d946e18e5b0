"""Markdown comparison tables from evaluation results: cells pooled over seeds, one section per task.

Cells that measure the same thing (same model name, task and grid point) are pooled: accuracy is total correct
over total scored, loss is weighted by tokens. So running a model again with another seed and merging the two files
tightens its numbers rather than adding a row. :meth:`EvalResults.markdown <mnemos.eval.results.EvalResults.markdown>`
renders through here; :mod:`mnemos.eval.report` writes the files and :mod:`mnemos.eval.plots` the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mnemos.data import longest_length_at
from mnemos.eval.registry import TASKS

if TYPE_CHECKING:  # annotations only: results.py imports this module (EvalResults.markdown)
    from mnemos.eval.results import Cell, EvalResults

__all__ = ["Notes", "Pooled", "acc", "capacity_summary", "fmt_length", "freeze", "jrt_section", "kv_bytes_section",
           "lookup", "markdown_report", "model_names", "pool", "si", "table"]


@dataclass
class Pooled:
    """The cells of one (model, task, grid point), pooled over seeds / runs."""

    model: str
    task: str
    params: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)

    @property
    def ok(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "ok"]

    @property
    def status(self) -> str:
        """``"ok"`` if any cell ran, else the status of the first (``"refused"`` / ``"error"``)."""
        return "ok" if self.ok else self.cells[0].status

    @property
    def message(self) -> str | None:
        return None if self.ok else self.cells[0].message

    @property
    def accuracy(self) -> float | None:
        n = sum(c.metrics.get("n", 0) for c in self.ok)
        return sum(c.metrics["correct"] for c in self.ok) / n if n else None

    @property
    def loss(self) -> float | None:
        tokens = sum(c.metrics.get("tokens", 0) for c in self.ok)
        return sum(c.metrics["loss"] * c.metrics["tokens"] for c in self.ok) / tokens if tokens else None

    def rate(self, hits: str, total: str) -> float | None:
        """``sum(metrics[hits]) / sum(metrics[total])`` over the cells that ran (None when nothing was counted, e.g.
        in results written before the metric existed)."""
        cells = [c for c in self.ok if c.metrics.get(hits) is not None and c.metrics.get(total)]
        n = sum(c.metrics[total] for c in cells)
        return sum(c.metrics[hits] for c in cells) / n if n else None

    def metric_max(self, name: str) -> Any:
        vals = [c.metrics[name] for c in self.ok if c.metrics.get(name) is not None]
        return max(vals) if vals else None


def freeze(params: dict[str, Any]) -> tuple:
    """A cell's params as a hashable key."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def pool(results: EvalResults, task: str) -> list[Pooled]:
    """The task's cells grouped by (model name, params), in order of first appearance."""
    groups: dict[tuple, Pooled] = {}
    for c in results.of_task(task):
        key = (c.model_name, freeze(c.params))
        if key not in groups:
            groups[key] = Pooled(c.model_name, task, dict(c.params))
        groups[key].cells.append(c)
    return list(groups.values())


def capacity_summary(results: EvalResults) -> dict[str, int | None]:
    """``{model: longest passkey length with accuracy >= threshold}`` (None if the shortest length misses it).

    Only lengths that ran count (a refused length ends the scan: nothing is claimed beyond it). The threshold is
    the cells' ``capacity_threshold`` option (0.95 unless changed).
    """
    out: dict[str, int | None] = {}
    by_model: dict[str, list[Pooled]] = {}
    for p in pool(results, "capacity"):
        by_model.setdefault(p.model, []).append(p)
    for model, points in by_model.items():
        threshold = points[0].cells[0].options.get("capacity_threshold", 0.95)
        by_length: dict[int, float] = {}
        for p in sorted(points, key=lambda p: p.params["length"]):
            if p.accuracy is None:
                break
            by_length[p.params["length"]] = p.accuracy
        out[model] = longest_length_at(by_length, threshold) if by_length else None
    return out


def fmt_length(n: int) -> str:
    """1024 -> "1K", 2097152 -> "2M", 1000 -> "1000"."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(n)


def si(x: float) -> str:
    """1234567 -> "1.23M": three significant digits and a k / M / G suffix."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


class Notes:
    """Footnotes for refused / failed cells: each distinct message numbered once."""

    def __init__(self):
        self.messages: list[str] = []

    def mark(self, p: Pooled | None, value: Callable[[Pooled], str]) -> str:
        if p is None:
            return ""
        if p.status == "ok":
            return value(p)
        msg = p.message or p.status
        if msg not in self.messages:
            self.messages.append(msg)
        return f"{'refused' if p.status == 'refused' else 'error'} [{self.messages.index(msg) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {m}" for i, m in enumerate(self.messages)]


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def acc(p: Pooled) -> str:
    """The pooled accuracy, two decimals (for :meth:`Notes.mark`)."""
    return f"{p.accuracy:.2f}"


def model_names(points: Sequence[Pooled]) -> list[str]:
    """The models of ``points``, in order of first appearance."""
    return list(dict.fromkeys(p.model for p in points))


def lookup(points: Sequence[Pooled]) -> dict[tuple, Pooled]:
    """``{(model, freeze(params)): point}``."""
    return {(p.model, freeze(p.params)): p for p in points}


def kv_bytes_section(results: EvalResults) -> list[str]:
    """When some cell ran under a KV-cache policy (``model.kv_policy``): accuracy beside the state each model
    carries per sequence, in bytes (``state_bytes``; ``kv_cache_bytes``, the ``nbytes`` of its KV caches), per task
    grid point (MQAR's shared-context modes apart: accuracy over all turns), every model of that point (policies,
    full caches, recurrent states) sorted by bytes."""
    if not any(c.model.get("kv_policy") for c in results.cells):
        return []
    rows = []
    for task in TASKS:
        for p in pool(results, task):
            if p.status != "ok" or p.accuracy is None or p.metric_max("state_bytes") is None:
                continue
            kv = p.metric_max("kv_cache_bytes")
            where = " ".join(f"{k}={v}" for k, v in p.params.items())
            rows.append((task, where, p.metric_max("state_bytes"),
                         [task, where, p.model, str(p.cells[0].model.get("kv_policy") or "—"),
                          f"{p.metric_max('state_bytes'):,}", "—" if kv is None else f"{kv:,}", f"{p.accuracy:.3f}"]))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return ["## Accuracy against state bytes", "",
            "The state each model carries per sequence after the context, in bytes (`kv_cache_bytes`: the `nbytes` "
            "of its KV caches, packed codes, scales and kept positions included), beside its accuracy: KV-cache "
            "policies and recurrent / neural-memory states on one axis (figure: `accuracy_vs_state_bytes.png`).", "",
            *table(["task", "point", "model", "KV policy", "state bytes / seq", "KV-cache bytes / seq", "accuracy"],
                   [r[3] for r in rows]), ""]


def jrt_section(results: EvalResults) -> list[str]:
    """When some cell ran with JRT-Prompt (``model.jrt_prompt``, ``mnemos eval --jrt``): each JRT point's accuracy
    beside the plain point of the same model (``model.jrt_base``) and grid point, and the difference."""
    if not any(c.model.get("jrt_prompt") for c in results.cells):
        return []
    notes = Notes()  # refusals are footnoted in the task sections already; here they show as their status

    def cell(p: Pooled | None) -> str:
        return "—" if p is None else notes.mark(p, acc).split(" [")[0]

    rows = []
    for task in TASKS:
        points = pool(results, task)
        look = lookup(points)
        for p in points:
            d = p.cells[0].model
            if not d.get("jrt_prompt"):
                continue
            plain = look.get((d.get("jrt_base"), freeze(p.params)))
            both = plain is not None and plain.accuracy is not None and p.accuracy is not None
            delta = f"{round(p.accuracy - plain.accuracy, 2) + 0.0:+.2f}" if both else "—"  # no "-0.00"
            rows.append([task, " ".join(f"{k}={v}" for k, v in p.params.items()), str(d.get("jrt_base")),
                         cell(plain), cell(p), delta])
    return ["## JRT-Prompt", "",
            "Each model on the plain prompt and on the JRT prompt (\"just read twice\": the context repeated before "
            "the queries; MQAR: the key-value pairs twice, answers scored at the same query tokens, near / far "
            "measured to the second copy; the generation tasks: the prompt before its question twice). The JRT rows "
            "are also in the task sections, as `<model> (JRT-Prompt)`.", "",
            *table(["task", "point", "model", "plain", "JRT-Prompt", "JRT - plain"], rows), ""]


def markdown_report(results: EvalResults) -> str:
    """One section per task present, in the order the tasks are registered (:mod:`mnemos.eval.tasks`): MQAR,
    S-NIAH (+ depth x length per model), BABILong, capacity, LM; each task's ``section`` writes its own.

    Refused and failed cells show as ``refused [n]`` / ``error [n]`` with the reason in a numbered note.
    """
    if not results.cells:
        return "# mnemos evaluation\n\n(no results)\n"
    notes = Notes()
    body: list[str] = []
    for task in TASKS.values():
        body += task.section(results, notes)
    body += kv_bytes_section(results)
    body += jrt_section(results)
    seeds = sorted({c.seed for c in results.cells})
    commits = sorted({str(c.versions.get("git_commit"))[:12] + ("+dirty" if c.versions.get("git_dirty") else "")
                      for c in results.cells})
    v = results.cells[0].versions
    head = ["# mnemos evaluation", "",
            f"Seeds: {', '.join(map(str, seeds))} (cells of several seeds or runs are pooled). "
            f"mnemos {v.get('mnemos')}, torch {v.get('torch')}, python {v.get('python')}; "
            f"commit(s) {', '.join(commits)}.",
            ""]
    tail = ["## Notes", "", *notes.lines(), ""] if notes.messages else []
    return "\n".join(head + body + tail)
