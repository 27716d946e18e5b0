"""benchmarks/flops.py: the analytic FLOP and byte counts behind op_speed.py's TFLOP/s and GB/s columns."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flops  # noqa: E402


def test_memory_rule_depth1_hand_count():
    # depth 1, D = 3, chunks of n = 2: per chunk 2nD² (anchor) + 4nD² (read at W and S) + 2n²D + 2n²D (intra-chunk)
    # + 4nD² (carry of W and S) = 10 * 2 * 9 + 4 * 4 * 3 = 180 + 48 = 228
    assert flops.memory_rule_chunk_flops(2, [(3, 3)]) == 228
    c = flops.memory_rule_counts(1, 4, 1, [(3, 3)], 2, io_bytes=4)
    assert c["fwd"]["flops"] == 2 * 228
    assert c["fwdbwd"]["flops"] == 3 * 2 * 228
    # a final partial chunk counts at its real length: n = 1 costs 10 * 9 + 4 * 3 = 102
    assert flops.memory_rule_counts(1, 5, 1, [(3, 3)], 2, io_bytes=4)["fwd"]["flops"] == 2 * 228 + 102


def test_memory_rule_depth2_hand_count():
    # (D_in, D_out) = (2, 4) then (4, 2), n = 3; mm = 2 * 3 * 2 * 4 = 48 for both layers
    # layer 1: 48 (anchor) + 96 (read) + 96 (carry) + 2*9*2 + 2*9*4 (intra) = 240 + 108 = 348
    # layer 2: 48 (anchor) + 48 (error backprop) + 96 + 96 + 2*9*4 + 2*9*2 = 288 + 108 = 396
    assert flops.memory_rule_chunk_flops(3, [(2, 4), (4, 2)]) == 348 + 396
    assert flops.memory_rule_layers(2, 2, 2) == [(2, 4), (4, 2)]
    assert flops.memory_rule_layers(8, 1, 4) == [(8, 8)]
    assert flops.memory_rule_layers(8, 3, 4) == [(8, 32), (32, 32), (32, 8)]


@pytest.mark.parametrize("layers", [[(3, 3)], [(4, 16), (16, 4)]])
def test_memory_rule_scales_linearly(layers):
    def f(B, T, H):
        return flops.memory_rule_counts(B, T, H, layers, 4, io_bytes=2)

    base = f(1, 8, 1)
    for B, T, H in ((3, 8, 1), (1, 24, 1), (1, 8, 5), (2, 16, 3)):
        factor = B * (T // 8) * H
        assert f(B, T, H)["fwd"]["flops"] == factor * base["fwd"]["flops"]
        assert f(B, T, H)["fwdbwd"]["flops"] == factor * base["fwdbwd"]["flops"]
    # bytes: the token streams scale with B T H; the shared initial weights only with H
    state = sum(i * o for i, o in layers) * 4  # bytes of one head's weights, float32
    for phase, state_reads in (("fwd", 1), ("fwdbwd", 3)):  # fwd+bwd: read in fwd and bwd, gradient written
        streams = base[phase]["bytes"] - state_reads * state
        assert f(3, 8, 1)[phase]["bytes"] == 3 * streams + state_reads * state
        assert f(1, 24, 1)[phase]["bytes"] == 3 * streams + state_reads * state
        assert f(1, 8, 5)[phase]["bytes"] == 5 * (streams + state_reads * state)


def test_memory_rule_bytes_hand_count():
    # B1 T4 H1, K = V = 3, bf16 q, k, v, o; float32 gates and weights
    c = flops.memory_rule_counts(1, 4, 1, [(3, 3)], 2, io_bytes=2)
    qkv, gates, o, w = 4 * 9 * 2, 4 * 3 * 4, 4 * 3 * 2, 9 * 4
    assert c["fwd"]["bytes"] == qkv + gates + w + o
    # backward: read q, k, v, gates, W and do; write dq, dk, dv, dgates, dW
    assert c["fwdbwd"]["bytes"] == (qkv + gates + w + o) + (qkv + gates + w + o) + (qkv + gates + w)
    # the final state (W_T and S_T per sequence) is written, and its gradient read, when requested
    f = flops.memory_rule_counts(1, 4, 1, [(3, 3)], 2, io_bytes=2, final_state=True)
    assert f["fwd"]["bytes"] == c["fwd"]["bytes"] + 2 * w
    assert f["fwdbwd"]["bytes"] == c["fwdbwd"]["bytes"] + 4 * w


def test_sdpa_counts():
    c = flops.sdpa_counts(2, 3, 8, 4, io_bytes=2)
    fwd = 4 * 2 * 3 * 8 * 8 * 4 // 2  # causal: half of 4 B H T² D
    assert c["fwd"]["flops"] == fwd
    assert c["fwdbwd"]["flops"] == fwd + 5 * fwd // 2
    assert flops.sdpa_counts(2, 3, 8, 4, io_bytes=2, causal=False)["fwd"]["flops"] == 2 * fwd
    x = 2 * 3 * 8 * 4 * 2
    assert c["fwd"]["bytes"] == 4 * x and c["fwdbwd"]["bytes"] == 11 * x
    assert flops.sdpa_counts(2, 3, 16, 4, io_bytes=2)["fwd"]["flops"] == 4 * fwd  # quadratic in T


def test_delta_rule_counts():
    n, K, V = 4, 2, 3
    # A: 2n²K; (I + A)⁻¹: 2n³/3; W, U: 2n²K + 2n²V; V' and S: 4nKV; O: 2nKV + 2n²K + 2n²V
    hand = 2 * 16 * 2 + (2 * 64) // 3 + 2 * 16 * 2 + 2 * 16 * 3 + 4 * 4 * 6 + 2 * 4 * 6 + 2 * 16 * 2 + 2 * 16 * 3
    assert flops.delta_rule_chunk_flops(n, K, V) == hand
    c = flops.delta_rule_counts(2, 8, 3, K, V, io_bytes=2, chunk_size=4)
    assert c["fwd"]["flops"] == 2 * 3 * 2 * hand and c["fwdbwd"]["flops"] == 3 * c["fwd"]["flops"]
    tokens = 2 * 8 * 3
    inputs, o = tokens * ((2 * K + V) * 2 + 2), tokens * V * 2
    assert c["fwd"]["bytes"] == inputs + o and c["fwdbwd"]["bytes"] == 2 * (inputs + o) + inputs


def test_ceiling_counts():
    assert flops.matmul_flops(8192, 8192, 8192) == 2 * 8192**3
    assert flops.copy_bytes(2**30) == 2**31


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_rule_count_matches_the_torch_path(depth):
    """The analytic forward count is torch's own matmul count of the chunked path, less the chunk coefficients."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mnemos.ops import neural_memory
    from mnemos.ops.memory_rule.cpu_scan import cpu_kernel

    B, T, H, D, E, C = 1, 48, 2, 8, 2, 16
    layers = flops.memory_rule_layers(D, depth, E)
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    theta, eta, alpha = 0.01 * torch.rand(B, T, H), torch.rand(B, T, H), 0.1 * torch.rand(B, T, H)
    weights = tuple(0.02 * torch.randn(H, d_out, d_in) for d_in, d_out in layers)
    def baddbmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):  # torch's baddbmm count
        batch, m, k = a_shape
        return 2 * batch * m * k * b_shape[-1]

    # the chunked path accumulates in place (baddbmm_), which torch's counter does not know by default; the torch
    # loop itself, not its compiled CPU form (whose arithmetic the counter cannot see)
    with cpu_kernel(False), FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_inplace}) \
            as counter:
        neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=C, residual=depth > 1, impl="torch")
    coefficients = B * H * (T // C) * (2 * C**3 + 2 * C**2)
    analytic = flops.memory_rule_counts(B, T, H, layers, C, io_bytes=4)["fwd"]["flops"]
    # equal today; 5 % of slack so that a reorganised torch path (not a wrong count) does not fail this test
    assert counter.get_total_flops() == pytest.approx(analytic + coefficients, rel=0.05)


def test_layer_speed_counts_the_rule_and_the_layers_linear_maps():
    """layer_speed.py's mnemos rows: the rule's count plus every linear map of the layer, whose FLOPs torch's own
    counter must agree with (a linear map added to or dropped from the layer, or counted once too often, fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    import layer_speed
    from speed_common import Shape

    from mnemos.layers import NeuralMemory

    s = Shape(batch=2, seq_len=24, dim=32, heads=2, head_dim=16, depth=2, expansion=2, chunk_size=8)
    got = layer_speed.mnemos_counts(s, None)
    rule = flops.memory_rule_counts(2, 24, 2, flops.memory_rule_layers(16, 2, 2), 8, io_bytes=4)
    layer = NeuralMemory(dim=32, heads=2, head_dim=16, depth=2, expansion=2, chunk_size=8)
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 3  # q / k / v, the gates and the output at least
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for m in linears:
            m(torch.randn(2, 24, m.in_features))
    linear = counter.get_total_flops()
    assert got["fwd"]["flops"] == rule["fwd"]["flops"] + linear
    assert got["fwdbwd"]["flops"] == rule["fwdbwd"]["flops"] + 3 * linear


def test_layer_speed_measures_the_ceiling_and_the_mnemos_rows_rate(tmp_path):
    import json
    import subprocess

    out = tmp_path / "layer.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "layer_speed.py"), "--batch", "1",
         "--seq-len", "32", "--dim", "32", "--heads", "2", "--chunk-size", "8", "--warmup", "1", "--repeats", "1",
         "--no-cpu-memory", "--only", "mnemos", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ceilings (this run" in proc.stdout and "%peak" in proc.stdout
    data = json.loads(out.read_text())
    row = next(r for r in data["rows"] if r["impl"] == "mnemos")
    ceiling = data["ceilings"]["matmul"]["tflops"]
    rate = row["counts"]["fwdbwd"]["flops"] / (row["fwdbwd_ms"] / 1e3) / 1e12
    assert ceiling > 0 and row["fwdbwd_tflops"] == pytest.approx(rate)
    assert row["fwdbwd_pct_peak"] == pytest.approx(100 * rate / ceiling)
