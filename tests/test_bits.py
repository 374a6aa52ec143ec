"""Effective bits per weight, checked by hand on small layers of every format."""

from __future__ import annotations

import math

import pytest
import torch

from latticequant import bits, formats, huffman
from latticequant.methods import bits_per_weight


def _gptq_tensors(d_out=64, d_in=128, b=4, group=32):
    g = torch.Generator().manual_seed(0)
    n_groups = d_in // group
    codes = torch.randint(0, 1 << b, (d_out, d_in), generator=g)
    scales = torch.rand(d_out, n_groups, generator=g) + 0.1
    zeros = torch.full((d_out, n_groups), float(1 << (b - 1)))
    g_idx = torch.arange(d_in) // group
    return formats.pack_gptq_parts(codes, scales, zeros, g_idx, b)


def test_gptq_layer_by_hand():
    tensors = _gptq_tensors()
    # qweight 16 x 64 int32 = 4 bits/weight; scales 4 x 64 fp16 = 0.5; qzeros 4 x 8 int32 =
    # 0.125; g_idx 128 int32 = 0.5
    parts = bits.bits_breakdown(tensors, 64 * 128)
    assert parts == {"qweight": 4.0, "scales": 0.5, "qzeros": 0.125, "g_idx": 0.5}
    assert bits.effective_bits(tensors, 64 * 128) == 5.125
    assert bits.total_bits(tensors) == 5.125 * 64 * 128
    # a second, independent count (the pipeline's)
    assert bits_per_weight(tensors, 64 * 128) == 5.125


def test_three_bit_packing_by_hand():
    tensors = _gptq_tensors(d_out=32, d_in=96, b=3, group=32)
    n = 32 * 96
    # 96 codes of 3 bits per column = 9 int32 words; 3 groups x (32 x 3 bits = 3 words) zeros
    expected = 9 * 32 * 32 + 3 * 32 * 16 + 3 * 3 * 32 + 96 * 32
    assert bits.total_bits(tensors) == expected
    assert bits.effective_bits(tensors, n) == expected / n


def test_ssqr_outliers_by_hand():
    tensors = _gptq_tensors(d_out=32, d_in=64, b=2, group=64)
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[3, [1, 5, 9]] = True
    mask[30, 0] = True
    tensors.update(formats.pack_csr(mask, torch.randn(32, 64)))
    n = 32 * 64
    # codes 2 bits; scales one fp16 per row; zeros 2 bits per row; g_idx 64 x 32; 33 int32 row
    # pointers; 4 outliers x (16-bit column + 16-bit value)
    expected = 2 * n + 32 * 16 + 32 * 2 + 64 * 32 + 33 * 32 + 4 * (16 + 16)
    assert bits.total_bits(tensors) == expected
    parts = bits.bits_breakdown(tensors, n)
    assert parts["outlier_rowptr"] * n == 33 * 32
    assert parts["outlier_col"] * n == parts["outlier_val"] * n == 4 * 16


def test_huffman_stream_and_table_by_hand():
    codes = torch.tensor([0, 0, 0, 0, 1, -1, 0, 2] * 4)
    table = huffman.build_table(codes)
    stream, payload = huffman.encode(codes, table)
    # counts -1:4, 0:20, 1:4, 2:4: the heap merges the two smallest first (ties by symbol
    # order: -1 and 1), so lengths are 0:1, 2:2, -1:3, 1:3; canonical codes follow
    assert table.code_of() == {0: "0", 2: "10", -1: "110", 1: "111"}
    assert payload == 20 * 1 + 4 * 2 + 4 * 3 + 4 * 3 == 52
    tensors = {
        "hptq_stream": torch.from_numpy(stream),
        "hptq_table": table.to_tensor(),
        "hptq_scale": torch.tensor([0.5], dtype=torch.float16),
        "hptq_shape": torch.tensor([4, 8], dtype=torch.int32),
    }
    # stream 7 bytes; table: the smaller of dense (6-byte header + 12 bytes first symbol and
    # span + 4 lengths at 2 bits = 19 bytes) and sparse (header + 1 byte of lengths + zigzag
    # varints of -1, 1, 1, 1 = 11 bytes); scale 16; shape 64
    assert len(table.to_bytes()) == 11 and table.to_bytes()[0] == 1
    expected = 7 * 8 + 11 * 8 + 16 + 64
    assert bits.total_bits(tensors) == expected
    assert bits.effective_bits(tensors, 32) == expected / 32
    # the payload without the final byte's padding, when a report wants it
    exact = bits.total_bits(tensors, exact_bits={"hptq_stream": payload})
    assert exact == expected - 4


def test_bad_input():
    tensors = _gptq_tensors()
    with pytest.raises(ValueError, match="n_weights"):
        bits.effective_bits(tensors, 0)
    with pytest.raises(ValueError, match="non-empty"):
        bits.effective_bits({}, 10)
    with pytest.raises(ValueError, match="not stored"):
        bits.effective_bits(tensors, 10, exact_bits={"nope": 3})
    with pytest.raises(ValueError, match="storage size"):
        bits.effective_bits(tensors, 10, exact_bits={"g_idx": 10**9})
    with pytest.raises(ValueError, match="tensor"):
        bits.tensor_bits([1, 2, 3])


def test_meet_target_lands_on_a_step_function_with_few_evaluations():
    # bits of a Gaussian-like code as a step function of log2 scale: 1/64-bit steps
    def evaluate(x):
        return math.floor((4.7 - 1.03 * x) * 64) / 64, x

    found = bits.meet_target(evaluate, 0.0, 3.125, 0.01, slope=-1.0)
    assert found.landed and 3.115 <= found.value <= 3.125
    assert found.evaluations <= 6
    # a brute-force scan agrees that the landing band is where the search stopped
    assert 3.115 <= evaluate(found.x)[0] <= 3.125


def test_meet_target_keeps_the_point_below_target_when_it_cannot_land():
    def evaluate(x):  # jumps over the band [2.9, 3.0]
        return (4.0 if x < 1.0 else 2.0), x

    found = bits.meet_target(evaluate, 0.0, 3.0, 0.1, slope=-1.0, x_tol=1e-3)
    assert not found.landed and found.value == 2.0
    assert 1.0 <= found.x < 1.0 + 2e-3


def test_meet_target_out_of_reach_reports_the_limit():
    def evaluate(x):
        return max(1.0, 5.0 - x), x

    with pytest.raises(bits.OutOfReach) as info:
        bits.meet_target(evaluate, 0.0, 0.5, 0.01, slope=-1.0, x_max=10.0)
    assert info.value.point.x == 10.0 and info.value.point.value == 1.0
    with pytest.raises(ValueError, match="negative"):
        bits.meet_target(evaluate, 0.0, 0.5, 0.01, slope=1.0)
