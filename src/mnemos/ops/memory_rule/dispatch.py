"""The public entry points of the memory rule: :func:`neural_memory` (one signature, the implementation picked by
device and config) and :func:`neural_memory_triton` (the chunked rule on the Triton kernels)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .backends import auto_opt_out_reason, triton_unsupported_reason
from .chunked import chunked_memory_rule, neural_memory_chunked
from .common import MemoryState
from .reference import neural_memory_reference
from .rule import MemoryRule, check_rule_inputs, chunked_unsupported_reason, resolve_rule, torch_unsupported_reason

IMPLS = ("auto", "triton", "torch", "reference")


def neural_memory_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor] | None = None,
    *,
    rule: str | MemoryRule = "titans",
    delta: Tensor | None = None,
    gamma: Tensor | None = None,
    chunk_size: int = 16,
    momentum: Sequence[Tensor] | None = None,
    residual: bool = True,
    activation: str = "gelu",
    loss: str | None = None,
    initial_state: MemoryState | None = None,
    output_final_state: bool = False,
    check_values: bool = True,
    normalize_step: bool = False,
) -> tuple[Tensor, MemoryState | None]:
    """The chunk-parallel form with the chunk loop in fused Triton kernels (triton_scan.py); same contract as
    :func:`neural_memory`. Raises ValueError naming the reason for configs the kernels do not cover
    (:func:`~.backends.triton_unsupported_reason`) and naming the axis for rules outside Titans' axes
    (:func:`~.rule.chunked_unsupported_reason`)."""
    rule = resolve_rule(rule, loss)
    reason = chunked_unsupported_reason(rule)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run this call: {reason}")
    check_rule_inputs(rule, q, delta, gamma, initial_state, check_values=check_values)
    return chunked_memory_rule(q, k, v, theta, eta, alpha, weights, chunk_size=chunk_size, momentum=momentum,
                               residual=residual, activation=activation, loss=rule.loss, initial_state=initial_state,
                               output_final_state=output_final_state, check_values=check_values,
                               normalize_step=normalize_step, backend="triton", rule=rule, gamma=gamma)


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor] | None = None,
    *,
    rule: str | MemoryRule = "titans",
    delta: Tensor | None = None,
    gamma: Tensor | None = None,
    chunk_size: int = 16,
    momentum: Sequence[Tensor] | None = None,
    residual: bool = True,
    activation: str = "gelu",
    loss: str | None = None,
    initial_state: MemoryState | None = None,
    output_final_state: bool = False,
    check_values: bool = True,
    normalize_step: bool = False,
    impl: str = "auto",
) -> tuple[Tensor, MemoryState | None]:
    """Write every token into a neural memory by gradient descent and read it back (Titans, arXiv 2501.00663, §3.2).

    The memory is ``M(x; W) = W_L a_{L-1} (+ x if residual)`` with ``a_0 = x``, ``a_l = act(W_l a_{l-1})``.
    Tokens are cut into chunks of ``chunk_size``; for token t of chunk c::

        u_t = grad_W || M(k_t; W_anchor) - v_t ||^2     (summed over V; W_anchor = memory at the end of chunk c-1)
        S_t = eta_t S_{t-1} - theta_t u_t                  (momentum: "surprise")
        W_t = (1 - alpha_t) W_{t-1} + S_t                  (decay: "forgetting")
        o_t = M(q_t; W_t)                                  (read after the token's own write)

    ``chunk_size=1`` is online gradient descent with momentum; ``alpha = 1`` empties the memory; ``theta = 0`` leaves
    it unchanged. That is the default rule, ``"titans"``; ``rule`` picks another point of the family (Miras, Atlas:
    :class:`mnemos.ops.MemoryRule`, presets :data:`mnemos.ops.RULES`; the semantics of every axis:
    :func:`mnemos.ops.neural_memory_reference` and docs/MEMORY_RULE.md). With a retention other than decay the state
    holds accumulators A and the memory reads ``mnemos.ops.effective_weights(A, rule)``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (l2-normalised by the Titans layer; any values are accepted).
        v: ``[B, T, H, V]`` values.
        theta: ``[B, T, H]`` inner learning rate, >= 0.
        eta: ``[B, T, H]`` momentum gate in [0, 1].
        alpha: ``[B, T, H]`` forgetting gate in [0, 1].
        weights: tuple of L layer weights, each ``[H, D_out, D_in]`` (one initial memory shared by every sequence) or
            ``[B, H, D_out, D_in]`` (per sequence); layer 1 takes K inputs, layer L gives V outputs. Omit it when
            ``initial_state`` is given.
        rule: a preset name (``"titans"``, ``"moneta"``, ``"yaad"``, ``"memora"``, ``"omeganet"``, ``"atlas"``,
            ``"linear_attention"``, ``"deltanet"``) or a :class:`~mnemos.ops.MemoryRule`. The chunked torch path
            covers every axis (lp / huber and the Omega window in its hand-written dual form; retention lq / kl and
            Muon with every token's state formed per chunk, autograd through each chunk: ``dense_scan.py``); the
            Triton kernels cover the rules with loss l2 or dot, retention decay, optimizer momentum and window 1
            (Titans, linear attention, DeltaNet); ``impl="triton"`` refuses any other rule with a ValueError naming
            the axis.
        delta: ``[B, T, H]`` Huber thresholds (> 0), required for (and only for) ``loss="huber"``.
        gamma: ``[B, T, H]`` window weights in [0, 1] (the Omega rule's gamma_i, weighting token i's loss in every
            write whose window holds it); ones when None. With window 1 it scales the token's gradient.
        chunk_size: tokens per gradient anchor, >= 1. Default 16 (the paper's setting).
        momentum: optional tuple like ``weights`` with leading ``[B, H]``: the initial surprise S_0 (zeros if None).
        residual: ``M(x) = ... + x``; needs K == V.
        activation: ``"gelu"`` (erf form) or ``"silu"`` between layers.
        loss: overrides the rule's loss (the older spelling of that axis): ``"l2"`` (Titans, ``||M(k) - v||^2``) or
            ``"dot"`` (``-<M(k), v>``; with depth 1, no residual, eta = alpha = 0 and theta = 1 this is linear
            attention), or ``"lp"`` / ``"huber"``. None: the rule's own.
        initial_state: a :class:`MemoryState` from an earlier call; the stream continues exactly, mid-chunk
            included (then ``chunk_size`` must match the state's).
        output_final_state: also return the state after the last token.
        check_values: check that q, k, v and the weights are finite and the gates in range (reads every value;
            on CUDA one host sync per check). Shapes, dtypes and devices are always checked. Layers that compute
            these inputs themselves pass False: a memory that overflows then gives non-finite outputs (which
            training skips like any overflow) instead of an error, and nothing waits on the GPU.
        normalize_step: divide each token's step by ``max(1, rho_t)``, ``rho_t`` = :func:`mnemos.ops.step_curvature`
            of its key at the anchor (``||grad_W l||^2 / ||grad_M l||^2``, how far a unit step moves the memory's
            own answer): ``theta`` then bounds the first-order change of that answer whatever the memory's depth,
            width or weights (a matrix memory with unit keys has ``rho = 1``: unchanged). The divisor is differentiated
            like the rest of the step. Not in the Triton kernels (auto takes the torch path).
        impl: ``"auto"`` (the Triton kernels on CUDA for the configs they cover, the chunked torch path otherwise,
            the reference for a rule the torch path does not cover (:func:`~.rule.torch_unsupported_reason`);
            ``MNEMOS_TRITON=0`` in the environment keeps auto on the torch path),
            ``"triton"`` (the kernels; ValueError naming the reason where they cannot run; on the CPU only under
            ``TRITON_INTERPRET=1``), ``"torch"`` (chunked torch path; on CPU tensors its chunk loop runs compiled where
            it covers the call, ``cpu_scan.py``: ``MNEMOS_CPU_KERNEL=0`` keeps it in PyTorch) or ``"reference"``
            (token-by-token, for testing).

    Returns:
        ``(o, state)``: o ``[B, T, H, V]`` in q's dtype; state a :class:`MemoryState` (float32 for half-precision
        inputs) or None. Differentiable with respect to every tensor argument.

    Example:
        >>> import torch
        >>> from mnemos.ops import neural_memory
        >>> B, T, H, D = 1, 10, 2, 8
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        >>> theta, eta, alpha = torch.full((B, T, H), 0.1), torch.full((B, T, H), 0.9), torch.zeros(B, T, H)
        >>> W = (0.1 * torch.randn(H, 4 * D, D), 0.1 * torch.randn(H, D, 4 * D))  # depth-2 MLP memory
        >>> o, state = neural_memory(q, k, v, theta, eta, alpha, W, chunk_size=4, output_final_state=True)
        >>> o.shape, state.weights[0].shape, state.offset
        (torch.Size([1, 10, 2, 8]), torch.Size([1, 2, 32, 8]), 2)
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    rule = resolve_rule(rule, loss)
    torch_reason = torch_unsupported_reason(rule)
    if impl == "reference" or (impl == "auto" and torch_reason is not None):
        return neural_memory_reference(
            q, k, v, theta, eta, alpha, weights, rule=rule, delta=delta, gamma=gamma, chunk_size=chunk_size,
            momentum=momentum, residual=residual, activation=activation, initial_state=initial_state,
            output_final_state=output_final_state, check_values=check_values, normalize_step=normalize_step,
        )
    kernels_reason = chunked_unsupported_reason(rule)  # the Triton kernels cover Titans' axes only
    if impl == "auto":
        on_gpu = isinstance(q, Tensor) and q.device.type == "cuda"
        kernels_ok = on_gpu and kernels_reason is None and auto_opt_out_reason() is None
        impl = "triton" if kernels_ok and triton_unsupported_reason(q, weights, initial_state, chunk_size) is None \
            else "torch"
    fn = {"torch": neural_memory_chunked, "triton": neural_memory_triton}[impl]  # each checks the rule and its inputs
    return fn(
        q, k, v, theta, eta, alpha, weights, rule=rule, delta=delta, gamma=gamma, chunk_size=chunk_size,
        momentum=momentum, residual=residual, activation=activation, initial_state=initial_state,
        output_final_state=output_final_state, check_values=check_values, normalize_step=normalize_step,
    )
