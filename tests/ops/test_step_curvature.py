"""mnemos.ops.step_curvature: ||grad_W l||^2 / ||grad_M l||^2 of the associative loss, against autograd."""

import pytest
import torch

from mnemos.ops import step_curvature
from mnemos.ops.memory_rule.common import activate

F64 = torch.float64


def _memory(x, ws, residual, activation):
    h = x
    for i, w in enumerate(ws):
        h = w @ h
        if i < len(ws) - 1:
            h = activate(h, activation)
    return h + x if residual else h


@pytest.mark.parametrize("depth,residual,activation", [(1, True, "gelu"), (2, True, "gelu"), (2, False, "silu"),
                                                       (3, True, "silu")])
def test_step_curvature_equals_autograd(depth, residual, activation):
    g = torch.Generator().manual_seed(depth)
    B, T, H, D, E = 2, 5, 3, 4, 6
    k = torch.randn(B, T, H, D, dtype=F64, generator=g)
    v = torch.randn(B, T, H, D, dtype=F64, generator=g)
    widths = [D] + [E] * (depth - 1) + [D]
    ws = [torch.randn(B, H, widths[i + 1], widths[i], dtype=F64, generator=g) / widths[i] ** 0.5
          for i in range(depth)]
    rho = step_curvature(k, v, ws, residual=residual, activation=activation)
    assert rho.shape == (B, T, H)
    for b, t, h in [(0, 0, 0), (1, 4, 2), (0, 2, 1)]:
        leaves = [w[b, h].clone().requires_grad_() for w in ws]
        err = _memory(k[b, t, h], leaves, residual, activation) - v[b, t, h]
        grads = torch.autograd.grad(err.pow(2).sum(), leaves)
        expected = sum(gr.pow(2).sum() for gr in grads) / (2 * err).pow(2).sum()
        torch.testing.assert_close(rho[b, t, h].double(), expected.detach(), rtol=1e-5, atol=0)


def test_matrix_memory_curvature_is_the_key_norm():
    k = torch.randn(1, 7, 2, 5, dtype=F64)
    rho = step_curvature(k, torch.randn_like(k), [torch.randn(2, 5, 5, dtype=F64)])
    torch.testing.assert_close(rho.double(), k.pow(2).sum(-1), rtol=1e-5, atol=0)
