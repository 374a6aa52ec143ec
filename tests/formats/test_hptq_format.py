"""The HPTQ layout at run time: the chunk index, the compressed CPU path, corrupt files refused.

References are independent of the chunk decoder: codes come from the quantizer itself, the
whole-stream decoder (:func:`huffman.decode`, pointer doubling over every bit position) and
float64 matmuls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latticequant import formats
from latticequant.formats import hptq as layout
from latticequant.formats import huffman
from latticequant.formats.bits import bits_breakdown, effective_bits
from latticequant.methods import hptq


def _codes(d_out, d_in, seed=0, spread=3.0):
    g = np.random.default_rng(seed)
    return np.round(g.standard_normal((d_out, d_in)) * spread).astype(np.int64)


def _tensors(codes: np.ndarray, chunk_rows: int, scale: float = 0.01, max_length=None):
    """A stored layer written by hand from codes (the quantizer is not needed for the layout)."""
    kw = {} if max_length is None else {"max_length": max_length}
    table = huffman.build_table(codes.reshape(-1), **kw)
    stream, _ = huffman.encode(codes.reshape(-1), table)
    t = {
        "hptq_stream": torch.from_numpy(stream),
        "hptq_table": table.to_tensor(),
        "hptq_scale": torch.tensor([scale], dtype=torch.float16),
        "hptq_shape": torch.tensor(codes.shape, dtype=torch.int32),
    }
    t.update(layout.chunk_index(torch.from_numpy(codes), table, chunk_rows))
    return t


def _reference(t, dtype=torch.float64) -> torch.Tensor:
    d_out, d_in = (int(v) for v in t["hptq_shape"])
    table = huffman.HuffmanTable.from_bytes(t["hptq_table"])
    codes = huffman.decode(t["hptq_stream"], table, d_out * d_in).reshape(d_out, d_in)
    return t["hptq_scale"].to(dtype) * torch.from_numpy(codes).to(dtype)


@pytest.mark.parametrize("lut_bits", [1, 4, 12])
@pytest.mark.parametrize("max_length", [8, 16, 32])
def test_chunk_decoder_equals_the_whole_stream_decoder(lut_bits, max_length):
    # a skewed distribution: long codes (the slow path) appear next to short ones
    g = np.random.default_rng(max_length)
    values = np.round(g.standard_t(1.5, size=(37, 29)) * 4).astype(np.int64)
    table = huffman.build_table(values.reshape(-1), max_length=max_length)
    stream, n_bits = huffman.encode(values.reshape(-1), table)
    for chunk in (1, 7, 29, 3 * 29, values.size):
        starts = huffman.chunk_starts(values, table, chunk)
        n_full = values.size // chunk
        sym, ends = huffman.decode_chunks(stream, table, starts[:n_full], chunk, lut_bits=lut_bits)
        whole = huffman.decode(stream, table, values.size)
        assert np.array_equal(sym.reshape(-1), whole[: n_full * chunk])
        assert np.array_equal(ends[:-1], starts[1:n_full])
        if n_full == len(starts):
            assert int(ends[-1]) == n_bits


def test_chunk_decoder_refuses_patterns_that_are_no_code():
    table = huffman.HuffmanTable(symbols=np.array([0, 1]), lengths=np.array([1, 2]))  # 0, 10
    with pytest.raises(huffman.HuffmanError, match="no code"):
        huffman.decode_chunks(np.array([0b11000000], dtype=np.uint8), table, [0], 2)
    with pytest.raises(huffman.HuffmanError, match="negative"):
        huffman.decode_chunks(np.array([0], dtype=np.uint8), table, [-1], 1)
    with pytest.raises(huffman.HuffmanError, match="empty"):
        huffman.decode_chunks(np.zeros(0, dtype=np.uint8), table, [0], 1)


@pytest.mark.parametrize("chunk_rows", [1, 3, 16, 50])
@pytest.mark.parametrize("d_out,d_in", [(50, 37), (17, 64)])
def test_compressed_path_matches_the_dense_weights(chunk_rows, d_out, d_in, monkeypatch):
    rows = min(chunk_rows, d_out)
    t = _tensors(_codes(d_out, d_in, seed=d_in + rows), rows)
    W = _reference(t)
    bias = torch.randn(d_out, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(layout, "TILE_ROWS", 8)  # several tiles, some cut inside a chunk span
    packed = formats.HuffmanLinear(t, bias=bias, cache_weight=False)
    dense = formats.HuffmanLinear(t, bias=bias, cache_weight=True)
    for batch in (1, 5):
        x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(batch))
        ref = x.double() @ W.T + bias.double()
        y = packed(x)
        assert packed.last_kernel == "torch-huffman"
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense(x), y, rtol=1e-6, atol=1e-6)
        assert dense.last_kernel == "torch-decoded"
        y64 = packed(x.double())  # float64 inputs decode into a float64 tile
        torch.testing.assert_close(y64, ref, rtol=1e-12, atol=1e-12)
    assert packed.cache_bytes == 0 and dense.cache_bytes == 4 * d_out * d_in
    assert torch.equal(packed.dequantize_weight(torch.float64), W)


def test_resident_bytes_are_the_stored_bytes():
    t = _tensors(_codes(96, 80, seed=4), 1)
    m = formats.HuffmanLinear(t, cache_weight=False)
    m(torch.randn(2, 80))
    stored = sum(v.numel() * v.element_size() for v in t.values())
    resident = sum(b.numel() * b.element_size() for b in m.buffers())
    tables = sum(
        b.numel() * b.element_size() for n, b in m.named_buffers() if n.startswith("code_")
    )
    assert resident == stored + tables and tables < 400
    assert m.cache_bytes == 0
    # the offsets and the rows per chunk count in the effective bits
    parts = bits_breakdown(t, 96 * 80)
    assert parts["hptq_offsets"] == 32 * 96 / (96 * 80) and parts["hptq_chunk_rows"] == 32 / 7680
    assert effective_bits(t, 96 * 80) == sum(parts.values())


def test_files_without_the_chunk_index_still_load():
    t = _tensors(_codes(30, 21, seed=2), 1)
    old = {k: t[k] for k in formats.HPTQ_KEYS}
    m = formats.HuffmanLinear(old, cache_weight=False)
    assert torch.equal(m.hptq_offsets, t["hptq_offsets"])  # found by decoding once
    assert set(m.state_dict()) == set(formats.HPTQ_KEYS)  # and not saved back
    x = torch.randn(3, 21)
    torch.testing.assert_close(m(x).double(), x.double() @ _reference(t).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(formats.FormatError, match="both"):
        formats.HuffmanLinear({**old, "hptq_offsets": t["hptq_offsets"]})


def _corruptions(t):
    off, stream = t["hptq_offsets"], t["hptq_stream"]
    shifted = off.clone()
    shifted[3] += 1
    swapped = off.clone()
    swapped[[2, 3]] = swapped[[3, 2]]
    flipped = stream.clone()
    flipped[len(stream) // 2] ^= 0x5A
    yield "an offset one bit late", {"hptq_offsets": shifted}, "ends at bit"
    yield "offsets out of order", {"hptq_offsets": swapped}, "offsets are corrupt"
    yield "an offset missing", {"hptq_offsets": off[:-1]}, "must hold"
    yield "an offset past the stream", {"hptq_offsets": off + 10**6}, "offsets are corrupt"
    yield "int64 offsets", {"hptq_offsets": off.long()}, "int32"
    yield "a truncated stream", {"hptq_stream": stream[:-3]}, "offsets are corrupt|truncated"
    yield "an extra byte", {"hptq_stream": torch.cat([stream, stream[:1]])}, "bytes"
    yield "flipped bits", {"hptq_stream": flipped}, "corrupt"
    yield "zero rows per chunk", {"hptq_chunk_rows": torch.tensor([0], dtype=torch.int32)}, "1..40"


@pytest.mark.parametrize("case", range(9))
def test_corrupt_streams_and_offsets_are_refused_at_load(case):
    t = _tensors(_codes(40, 33, seed=7), 1)
    what, change, match = list(_corruptions(t))[case]
    with pytest.raises(formats.FormatError, match=match) as info:
        formats.get_format("hptq").module({**t, **change}, {})
    assert "\n" not in str(info.value), what


def test_quantizer_meets_its_target_with_the_index_counted():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g) * 0.02
    X = torch.randn(400, 96, generator=g)
    H = X.T @ X / 400
    for rows in (1, 8, 64):
        cfg = hptq.HPTQConfig(target_bits=3.125, chunk_rows=rows)
        r = hptq.hptq_quantize(W, H, cfg)
        t = hptq.hptq_tensors(r)
        assert t["hptq_offsets"].numel() == -(-64 // rows)
        assert 3.115 <= effective_bits(t, W.numel()) <= 3.125
        assert torch.equal(formats.HuffmanLinear(t, cache_weight=False).dequantize_weight(), r.Q)
    with pytest.raises(ValueError, match="chunk_rows"):
        hptq.HPTQConfig(chunk_rows=0)
