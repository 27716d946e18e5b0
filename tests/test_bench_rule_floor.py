"""benchmarks/rule_floor.py: the lower-bound FLOP counts behind the arithmetic floor of issue 14's presets."""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rule_floor  # noqa: E402
from mnemos.ops import RULES  # noqa: E402

LAYERS = [(64, 256), (256, 64)]  # the depth-2 memory of head dim 64, expansion 4


def test_titans_needs_nothing_beyond_its_chunked_form():
    assert rule_floor.extra_flops(RULES["titans"], LAYERS, 100) == (0.0, 0.0)
    assert rule_floor.extra_flops(RULES["yaad"], LAYERS, 100) == (0.0, 0.0)  # a loss only: the dual form holds


def test_dense_retentions_count_five_flops_per_state_entry_and_token():
    entries = 2 * 64 * 256
    for name in ("moneta", "memora"):
        assert rule_floor.extra_flops(RULES[name], LAYERS, 7) == (5 * entries * 7, 10 * entries * 7)


def test_muon_counts_newton_schulz_on_every_token():
    # per layer (m, n) = (64, 256): each NS step in the Gram domain, four 64^3 products (on X itself: X X^T 2 m^2 n,
    # its square 2 m^3, times X 2 m^2 n, more than twice that)
    ns_step = 8 * 64 ** 3
    assert 2 * ns_step < 2 * 64 * 64 * 256 + 2 * 64 ** 3 + 2 * 64 * 64 * 256
    entries = 64 * 256
    atlas = RULES["atlas"]  # 5 steps, window 4
    per_layer_fwd = 5 * ns_step + 4 * entries + 2 * entries * 3
    per_layer_fwdbwd = 3 * 5 * ns_step + 2 * (4 * entries + 2 * entries * 3)
    assert rule_floor.extra_flops(atlas, LAYERS, 3) == (2 * per_layer_fwd * 3, 2 * per_layer_fwdbwd * 3)
    # no Newton-Schulz steps and a window of one: only the per-token states remain
    bare = replace(atlas, ns_steps=0, window=1)
    assert rule_floor.extra_flops(bare, LAYERS, 1) == (2 * 4 * entries, 2 * 2 * 4 * entries)


def test_square_layers_count_newton_schulz_on_x_itself():
    """m = n: the Gram domain's four m^3 products cost more than X X^T, its square and (.) X (6 m^3): the floor takes
    the cheaper form."""
    atlas = replace(RULES["atlas"], window=1)
    entries = 64 * 64
    assert rule_floor.extra_flops(atlas, [(64, 64)], 1)[0] == 5 * 6 * 64 ** 3 + 4 * entries


def test_muon_in_the_chunks_row_space_when_the_chunk_is_given():
    """Chunk 16, window 4 on (64, 256): every S_t's rows lie in 64 + 16 + 3 = 83 dimensions, so NS on 64 x 83
    coordinates (4 m^2 c + 2 m^3 a step) is cheaper than the Gram domain's 8 m^3, and only the coordinates are formed;
    a chunk large enough to span the whole row leaves NS at the Gram domain's count, with the momentum's m x n
    entries formed once (no accumulator: the reads need only NS of each momentum)."""
    atlas = RULES["atlas"]
    c = 64 + 16 + 3
    ns_step = 4 * 64 * 64 * c + 2 * 64 ** 3
    assert ns_step < 8 * 64 ** 3
    per_layer = (5 * ns_step + 2 * 64 * c, 3 * 5 * ns_step + 2 * 2 * 64 * c)
    assert rule_floor.extra_flops(atlas, LAYERS, 3, chunk=16) == (2 * per_layer[0] * 3, 2 * per_layer[1] * 3)
    wide = (5 * 8 * 64 ** 3 + 2 * 64 * 256, 3 * 5 * 8 * 64 ** 3 + 2 * 2 * 64 * 256)
    assert rule_floor.extra_flops(atlas, LAYERS, 3, chunk=512) == (2 * wide[0] * 3, 2 * wide[1] * 3)
