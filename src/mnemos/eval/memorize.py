"""Test-time memorisation: write N random key -> value pairs into a neural memory by the memory rule, read them back.

No outer training is involved: the memory starts from a fixed random W_0 (zero for a matrix memory) and learns the
pairs only through its own inner gradient descent (``mnemos.ops.neural_memory``). A pair counts as recalled when the
memory's answer to its key is closer (cosine) to its value than to any other stored value. This is the purest view
of what the memory rule can hold, and how depth and chunk size (the gradient anchor) change that.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..ops import memory_read, neural_memory


@dataclass
class MemorizeConfig:
    """A grid of memorisation runs.

    Attributes:
        head_dim: D, the key and value width of the memory.
        n_pairs: numbers of key -> value pairs to write (one run per value).
        depths: memory depths L (1 = matrix memory ``M(x) = W x``; >= 2 = residual MLP memory).
        chunk_sizes: tokens per gradient anchor.
        passes: how many times the stream of pairs is written (in the same order).
        theta, eta: inner learning rate and momentum, constant over the stream; alpha (forgetting) is 0.
        expansion: hidden width factor of MLP memories.
        seed: draws keys, values and W_0.
    """

    head_dim: int = 32
    n_pairs: tuple[int, ...] = (16, 32, 64, 128)
    depths: tuple[int, ...] = (1, 2, 3)
    chunk_sizes: tuple[int, ...] = (1, 16, 64)
    passes: int = 4
    theta: float = 0.2
    eta: float = 0.0
    expansion: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        for name in ("n_pairs", "depths", "chunk_sizes"):
            vals = tuple(getattr(self, name))
            if not vals or any((not isinstance(v, int)) or v < 1 for v in vals):
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {vals!r}")
            setattr(self, name, vals)
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")
        if self.theta < 0:
            raise ValueError(f"theta must be >= 0, got {self.theta}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")


@dataclass
class MemorizeResult:
    depth: int
    chunk_size: int
    n_pairs: int
    recall: float  # fraction of keys whose answer is nearest to their own value
    cosine: float  # mean cosine between answer and value
    seconds: float


@dataclass
class MemorizeReport:
    config: MemorizeConfig
    results: list[MemorizeResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "results": [asdict(r) for r in self.results]}

    def table(self) -> str:
        """Markdown table: one row per (depth, chunk size), one column per number of pairs."""
        cfg = self.config
        head = "| depth | chunk | " + " | ".join(f"N={n}" for n in cfg.n_pairs) + " |"
        lines = [head, "|" + "---|" * (2 + len(cfg.n_pairs))]
        by_key = {(r.depth, r.chunk_size, r.n_pairs): r for r in self.results}
        for d in cfg.depths:
            for c in cfg.chunk_sizes:
                cells = [f"{by_key[(d, c, n)].recall:.2f}" for n in cfg.n_pairs if (d, c, n) in by_key]
                if cells:
                    lines.append(f"| {d} | {c} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def memorize_once(n_pairs: int, head_dim: int, depth: int, chunk_size: int, *, passes: int, theta: float,
                  eta: float, expansion: int, seed: int) -> MemorizeResult:
    """Write ``n_pairs`` unit-norm random pairs ``passes`` times into one memory head and read every key back."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    D = head_dim
    keys = F.normalize(torch.randn(n_pairs, D, generator=g), dim=-1)  # [N, D]
    values = F.normalize(torch.randn(n_pairs, D, generator=g), dim=-1)  # [N, D]
    residual = depth > 1
    if depth == 1:
        weights = (torch.zeros(1, D, D),)  # [H=1, D, D]: an empty matrix memory
    else:
        widths = [D] + [expansion * D] * (depth - 1) + [D]
        weights = tuple(torch.randn(1, widths[i + 1], widths[i], generator=g) / widths[i] ** 0.5 for i in range(depth))
    k = keys.repeat(passes, 1)[None, :, None]  # [B=1, T=N*passes, H=1, D]
    v = values.repeat(passes, 1)[None, :, None]
    T = k.shape[1]
    theta_t = torch.full((1, T, 1), theta)
    eta_t = torch.full((1, T, 1), eta)
    alpha_t = torch.zeros(1, T, 1)
    with torch.no_grad():
        _, state = neural_memory(k, k, v, theta_t, eta_t, alpha_t, weights, chunk_size=chunk_size, residual=residual,
                                 output_final_state=True)
        answer = memory_read(keys[None, :, None], state.weights, residual=residual)[0, :, 0]  # [N, D]
    sim = F.normalize(answer, dim=-1) @ values.T  # [N, N]
    recall = (sim.argmax(-1) == torch.arange(n_pairs)).float().mean().item()
    cosine = sim.diagonal().mean().item()
    return MemorizeResult(depth, chunk_size, n_pairs, recall, cosine, time.perf_counter() - t0)


def run_memorize(cfg: MemorizeConfig, progress=None) -> MemorizeReport:
    """Run the whole grid; ``progress(result)`` is called after each run."""
    report = MemorizeReport(cfg)
    for depth in cfg.depths:
        for chunk in cfg.chunk_sizes:
            for n in cfg.n_pairs:
                r = memorize_once(n, cfg.head_dim, depth, chunk, passes=cfg.passes, theta=cfg.theta, eta=cfg.eta,
                                  expansion=cfg.expansion, seed=cfg.seed)
                report.results.append(r)
                if progress is not None:
                    progress(r)
    return report
