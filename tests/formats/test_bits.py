"""Effective bits per weight, checked by hand on small layers of every format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latticequant import formats
from latticequant.formats import bits, huffman


def _gptq_tensors(d_out=64, d_in=128, b=4, group=32):
    g = torch.Generator().manual_seed(0)
    n_groups = d_in // group
    codes = torch.randint(0, 1 << b, (d_out, d_in), generator=g)
    scales = torch.rand(d_out, n_groups, generator=g) + 0.1
    zeros = torch.full((d_out, n_groups), float(1 << (b - 1)))
    g_idx = torch.arange(d_in) // group
    return formats.pack_gptq_parts(codes, scales, zeros, g_idx, b)


def test_gptq_layer_by_hand(tmp_path):
    tensors = _gptq_tensors()
    # qweight 16 x 64 int32 = 4 bits/weight; scales 4 x 64 fp16 = 0.5; qzeros 4 x 8 int32 =
    # 0.125; g_idx 128 int32 = 0.5
    parts = bits.bits_breakdown(tensors, 64 * 128)
    assert parts == {"qweight": 4.0, "scales": 0.5, "qzeros": 0.125, "g_idx": 0.5}
    assert bits.effective_bits(tensors, 64 * 128) == 5.125
    assert bits.total_bits(tensors) == 5.125 * 64 * 128
    # an independent count: the data section of the safetensors file that holds the layer
    path = tmp_path / "layer.safetensors"
    save_file(tensors, str(path))
    with open(path, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
    assert (path.stat().st_size - 8 - header) * 8 == bits.total_bits(tensors)


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
