"""Canonical Huffman coding: exact round trips, prefix-free canonical codes, optimal lengths."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
import torch

from latticequant.formats import huffman as hf


def _reference_cost(counts) -> int:
    """Optimal unrestricted code cost: the sum of the merged weights (an independent heap)."""
    heap = [int(c) for c in counts]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def _reference_decode(bits: str, code_of: dict[int, str], n: int) -> list[int]:
    """Bit-by-bit prefix matching, no tables."""
    symbol_of = {c: s for s, c in code_of.items()}
    out, word = [], ""
    for b in bits:
        word += b
        if word in symbol_of:
            out.append(symbol_of[word])
            word = ""
            if len(out) == n:
                break
    return out


def _round_trip(values: np.ndarray, **kw) -> hf.HuffmanTable:
    table = hf.build_table(values, **kw)
    stream, n_bits = hf.encode(values, table)
    assert stream.dtype == np.uint8 and stream.size == (n_bits + 7) // 8
    decoded = hf.decode(stream, table, values.size)
    np.testing.assert_array_equal(decoded, values.reshape(-1))
    # the stored table alone suffices to decode
    again = hf.HuffmanTable.from_bytes(table.to_bytes())
    np.testing.assert_array_equal(hf.decode(stream.tobytes(), again, values.size), decoded)
    return table


@pytest.mark.parametrize(
    "name",
    ["skewed", "flat", "one_symbol", "one_value", "negative", "large", "gaussian"],
)
def test_round_trip_distributions(name):
    rng = np.random.default_rng(1)
    values = {
        "skewed": rng.geometric(0.6, 20000) - 1,
        "flat": rng.integers(0, 256, 20000),
        "one_symbol": np.full(5000, 3),
        "one_value": np.array([-7]),
        "negative": rng.integers(-40, -10, 3000),
        "large": rng.choice([-(2**62), -(2**40), 0, 5, 2**40 + 1, 2**62], 4000),
        "gaussian": np.round(rng.standard_normal(50000) * 4),
    }[name].astype(np.int64)
    table = _round_trip(values)
    if name in ("one_symbol", "one_value"):
        assert table.n_symbols == 1 and int(table.lengths[0]) == 1


@pytest.mark.parametrize("seed", range(8))
def test_round_trip_random_sizes_against_reference_decoder(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    k = int(rng.integers(1, 60))
    support = rng.integers(-1000, 1000, k)
    values = rng.choice(support, n, p=rng.dirichlet(np.full(k, 0.3)))
    table = _round_trip(values)
    stream, n_bits = hf.encode(values, table)
    bits = "".join(format(b, "08b") for b in stream.tolist())[:n_bits]
    assert _reference_decode(bits, table.code_of(), n) == values.tolist()


def test_torch_input_and_tensor_table():
    codes = torch.tensor([[0, 1, -1], [2, 0, 0]])
    table = hf.build_table(codes)
    stream, _ = hf.encode(codes, table)
    stored = table.to_tensor()
    assert stored.dtype == torch.uint8 and stored.numel() * 8 == table.size_bits
    back = hf.decode(torch.from_numpy(stream), hf.HuffmanTable.from_bytes(stored), 6)
    assert back.tolist() == codes.reshape(-1).tolist()


def test_worked_example_in_docstring():
    table = hf.table_from_counts([0, 1, -1, 7], [5, 2, 2, 1])
    assert table.code_of() == {0: "0", -1: "10", 1: "110", 7: "111"}


@pytest.mark.parametrize("seed", range(5))
def test_prefix_free_canonical_and_optimal(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 40))
    counts = rng.integers(1, 1000, k) ** rng.integers(1, 3)
    symbols = rng.choice(np.arange(-500, 500), k, replace=False)
    table = hf.table_from_counts(symbols, counts)
    codes = table.code_of()
    words = list(codes.values())
    for a, b in itertools.permutations(words, 2):
        assert not b.startswith(a), (a, b)
    # canonical: in (length, symbol) order the left-aligned codes increase by exactly one step
    L = table.max_length
    ordered = sorted(codes.items(), key=lambda kv: (len(kv[1]), kv[0]))
    assert [s for s, _ in ordered] == table.symbols.tolist()
    aligned = [int(c, 2) << (L - len(c)) for _, c in ordered]
    assert aligned[0] == 0 and all(x < y for x, y in zip(aligned, aligned[1:]))
    for (_, c), (_, d) in zip(ordered, ordered[1:]):
        assert int(d, 2) == (int(c, 2) + 1) << (len(d) - len(c))
    # complete code (Kraft sum 1) and optimal cost (equal to the independent reference)
    assert sum(2.0 ** -len(c) for c in words) == 1.0
    cost = table.encoded_bits(symbols, counts)
    assert cost == _reference_cost(counts)
    avg, h = cost / counts.sum(), hf.entropy_bits(counts)
    assert h - 1e-12 <= avg < h + 1


def _brute_force_limited_cost(counts, max_length) -> int:
    best = None
    for lengths in itertools.product(range(1, max_length + 1), repeat=len(counts)):
        if sum(2.0**-x for x in lengths) <= 1.0:
            cost = sum(c * x for c, x in zip(counts, lengths))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_limited_is_optimal_by_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(3, 7))
    counts = (2.0 ** rng.integers(0, 12, n)).astype(np.int64) + rng.integers(0, 3, n)
    max_length = int(np.ceil(np.log2(n)))
    lengths = hf.code_lengths(counts, max_length=max_length)
    assert lengths.max() <= max_length
    assert sum(2.0 ** -int(x) for x in lengths) <= 1.0
    assert int((lengths * counts).sum()) == _brute_force_limited_cost(counts.tolist(), max_length)


def test_length_limit_applies_and_round_trips():
    counts = 2 ** np.arange(40, dtype=np.int64)  # unrestricted Huffman needs 39-bit codes
    assert hf.code_lengths(counts, max_length=None).max() == 39
    lengths = hf.code_lengths(counts, max_length=24)
    assert lengths.max() == 24 and sum(2.0 ** -int(x) for x in lengths) == 1.0
    table = hf.table_from_counts(np.arange(40), np.minimum(counts, 10**6), max_length=8)
    values = np.repeat(np.arange(40), 3)
    _round_trip_with(table, values)


def _round_trip_with(table, values):
    stream, _ = hf.encode(values, table)
    np.testing.assert_array_equal(hf.decode(stream, table, values.size), values)


def test_table_serialisation_dense_and_sparse():
    dense = hf.table_from_counts(np.arange(-8, 9), np.arange(1, 18))
    sparse = hf.table_from_counts([-(2**50), 0, 3, 2**50], [4, 9, 1, 1])
    assert dense.to_bytes()[0] == 0 and sparse.to_bytes()[0] == 1
    for t in (dense, sparse):
        back = hf.HuffmanTable.from_bytes(t.to_bytes())
        np.testing.assert_array_equal(back.symbols, t.symbols)
        np.testing.assert_array_equal(back.lengths, t.lengths)
        assert t.size_bits == 8 * len(t.to_bytes())
    # dense by hand: 6-byte header, 12 bytes (first symbol, span), 17 lengths x 3 bits -> 7 bytes
    assert len(dense.to_bytes()) == 6 + 12 + 7


def test_decode_of_a_layer_sized_stream():
    # correctness only: how fast this decodes is for benchmarks, not for a test
    rng = np.random.default_rng(0)
    values = np.round(rng.standard_normal(576 * 1536) * 3).astype(np.int64)
    table = hf.build_table(values)
    stream, _ = hf.encode(values, table)
    decoded = hf.decode(stream, table, values.size)
    np.testing.assert_array_equal(decoded, values)


def test_bad_input():
    with pytest.raises(hf.HuffmanError, match="integers"):
        hf.build_table(np.array([0.5, 1.0]))
    with pytest.raises(hf.HuffmanError, match="integers"):
        hf.build_table(torch.tensor([0.5]))
    with pytest.raises(hf.HuffmanError, match="empty"):
        hf.build_table(np.zeros(0, dtype=np.int64))
    with pytest.raises(hf.HuffmanError, match="positive"):
        hf.code_lengths([3, 0, 1])
    with pytest.raises(hf.HuffmanError, match="cannot be coded"):
        hf.code_lengths(np.ones(9, dtype=np.int64), max_length=3)
    table = hf.build_table(np.array([0, 1, 1, 2]))
    with pytest.raises(hf.HuffmanError, match="not in the Huffman table"):
        hf.encode(np.array([0, 5]), table)
    stream, _ = hf.encode(np.array([0, 1, 2, 1] * 10), table)
    with pytest.raises(hf.HuffmanError, match="ends before"):
        hf.decode(stream, table, 1000)
    with pytest.raises(hf.HuffmanError, match="uint8"):
        hf.decode(np.zeros(3, dtype=np.int32), table, 1)
    with pytest.raises(hf.HuffmanError):
        hf.HuffmanTable.from_bytes(b"\x07\x03")
    with pytest.raises(hf.HuffmanError, match="Kraft"):
        hf.HuffmanTable(symbols=np.array([0, 1, 2]), lengths=np.array([1, 1, 1]))
    with pytest.raises(hf.HuffmanError, match="distinct"):
        hf.HuffmanTable(symbols=np.array([0, 0]), lengths=np.array([1, 1]))
    # an incomplete code: a pattern that is no code word is reported, not mis-decoded
    single = hf.build_table(np.array([4, 4]))
    with pytest.raises(hf.HuffmanError, match="no code"):
        hf.decode(np.array([0xFF], dtype=np.uint8), single, 3)
