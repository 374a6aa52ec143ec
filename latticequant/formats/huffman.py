"""Canonical Huffman codes over integer symbols, with a real packed bitstream.

HPTQ (docs/theory.md §7) stores unbounded integer codes entropy-coded. Everything here is exact: the
encoder writes an actual MSB-first bitstream, the decoder reads it back symbol for symbol, and
the code table has a concrete byte serialisation whose size is what effective bits count.

Code lengths come from the classic heap construction; when that exceeds ``max_length`` they are
recomputed by package-merge (Larmore and Hirschberg), which gives the optimal code among those
no longer than the limit. Codes are canonical: sorted by ``(length, symbol)`` and numbered
consecutively, so the lengths alone define the code and decoding needs only one threshold per
length (no tree, no ``2^L`` table).

Worked example: counts ``{0: 5, 1: 2, -1: 2, 7: 1}`` give lengths ``0 -> 1``, ``-1 -> 2``,
``1 -> 3``, ``7 -> 3`` (ties broken by symbol), hence canonical codes ``0 -> 0``, ``-1 -> 10``,
``1 -> 110``, ``7 -> 111``.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "HuffmanError",
    "HuffmanTable",
    "code_lengths",
    "build_table",
    "table_from_counts",
    "symbol_counts",
    "encode",
    "decode",
    "decode_chunks",
    "canonical_constants",
    "chunk_starts",
    "symbol_lengths",
    "entropy_bits",
    "MAX_LENGTH",
]

MAX_LENGTH = 24
"""Default longest code: a 24-bit window decodes any code, and 2^24 symbols are allowed."""

_HARD_MAX_LENGTH = 56  # the decoder reads a 64-bit word at a byte offset: L + 7 <= 64 bits
_FORMAT_DENSE = 0
_FORMAT_SPARSE = 1
_HEADER = struct.Struct("<BBI")  # format, max_length, number of symbols


class HuffmanError(ValueError):
    """A Huffman table or bitstream that is malformed or does not fit the data."""


def _as_int_array(values) -> np.ndarray:
    """Flat int64 numpy view of integer symbols given as a tensor, array or sequence."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise HuffmanError(f"symbols must be integers, got a {values.dtype} tensor")
        return values.detach().cpu().reshape(-1).to(torch.int64).numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            return arr.astype(np.int64).reshape(-1)
        raise HuffmanError(f"symbols must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise HuffmanError("symbols must fit in a signed 64-bit integer")
    return arr.astype(np.int64, copy=False).reshape(-1)


def symbol_counts(values) -> tuple[np.ndarray, np.ndarray]:
    """Distinct symbols (ascending) and how often each occurs.

    Uses ``bincount`` over the symbol range when it is narrow (the usual case for quantization
    codes), a sort otherwise.
    """
    v = _as_int_array(values)
    if v.size == 0:
        raise HuffmanError("cannot count symbols of an empty sequence")
    lo, hi = int(v.min()), int(v.max())
    if hi - lo < 4 * v.size + 1024:
        counts = np.bincount(v - lo, minlength=hi - lo + 1)
        present = np.flatnonzero(counts)
        return present.astype(np.int64) + lo, counts[present].astype(np.int64)
    symbols, counts = np.unique(v, return_counts=True)
    return symbols.astype(np.int64), counts.astype(np.int64)


def entropy_bits(counts) -> float:
    """Shannon entropy of the empirical distribution, in bits per symbol."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        raise HuffmanError("entropy of an empty distribution")
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def _heap_lengths(counts: np.ndarray) -> np.ndarray:
    """Unrestricted Huffman code lengths; ties broken by index so the result is deterministic."""
    n = counts.size
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    for k in range(n - 1):
        wa, a = heapq.heappop(heap)
        wb, b = heapq.heappop(heap)
        parent[a] = parent[b] = n + k
        heapq.heappush(heap, (wa + wb, n + k))
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    return depth[:n]


def _package_merge_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Optimal code lengths no longer than ``max_length`` (package-merge).

    Every list below holds "coins" of one denomination ``2^-l``: the symbols themselves and
    packages of two coins of the next smaller denomination, sorted by weight. The optimal
    solution takes the ``2n - 2`` cheapest coins of denomination ``1/2``; a package taken at
    one level takes its two halves at the next, and since packages are made from consecutive
    pairs the taken items of every list form a prefix. A symbol's code length is the number of
    lists in whose taken prefix it appears; those are always its cheapest symbols.
    """
    n = counts.size
    order = np.argsort(counts, kind="stable")
    leaf_w = counts[order].astype(np.int64)
    # Build the lists from the deepest level (l = max_length) up to l = 1.
    weights = leaf_w.copy()
    is_leaf = np.ones(n, dtype=bool)
    levels_is_leaf = [is_leaf]
    for _ in range(max_length - 1):
        m = weights.size // 2
        pkg = weights[: 2 * m : 2] + weights[1 : 2 * m : 2]
        merged_w = np.concatenate([leaf_w, pkg])
        merged_leaf = np.concatenate([np.ones(n, dtype=bool), np.zeros(m, dtype=bool)])
        idx = np.argsort(merged_w, kind="stable")  # leaves first among equal weights
        weights, is_leaf = merged_w[idx], merged_leaf[idx]
        levels_is_leaf.append(is_leaf)
    lengths_sorted = np.zeros(n, dtype=np.int64)
    take = 2 * n - 2
    for is_leaf in reversed(levels_is_leaf):  # from l = 1 down to l = max_length
        prefix = is_leaf[:take]
        n_leaves = int(prefix.sum())
        lengths_sorted[:n_leaves] += 1
        take = 2 * (take - n_leaves)
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = lengths_sorted
    return lengths


def code_lengths(counts, max_length: int | None = MAX_LENGTH) -> np.ndarray:
    """Huffman code lengths for positive ``counts``, optimal under ``length <= max_length``.

    A single symbol gets a 1-bit code (a stream must spend at least one bit per symbol to be
    decodable without knowing the count in advance, and the decoder reads whole codes).
    """
    c = np.asarray(counts)
    if c.ndim != 1 or c.size == 0:
        raise HuffmanError("counts must be a non-empty 1-D sequence")
    if c.dtype.kind not in "iu":
        if c.dtype.kind != "f" or not np.all(c == np.round(c)):
            raise HuffmanError(f"counts must be integers, got dtype {c.dtype}")
    c = c.astype(np.int64)
    if (c <= 0).any():
        raise HuffmanError("every count must be positive (drop symbols that do not occur)")
    limit = _HARD_MAX_LENGTH if max_length is None else max_length
    if not isinstance(limit, int) or not 1 <= limit <= _HARD_MAX_LENGTH:
        raise HuffmanError(f"max_length must be an integer from 1 to {_HARD_MAX_LENGTH}")
    n = c.size
    if n == 1:
        return np.ones(1, dtype=np.int64)
    if n > (1 << limit):
        raise HuffmanError(f"{n} symbols cannot be coded with codes of at most {limit} bits")
    lengths = _heap_lengths(c)
    if lengths.max() > limit:
        lengths = _package_merge_lengths(c, limit)
    return lengths


@dataclass(frozen=True)
class HuffmanTable:
    """A canonical code: symbols in canonical order ``(length, symbol)`` and their lengths.

    The codes themselves follow from the lengths; ``to_bytes`` is the stored form and
    ``size_bits`` its exact size.
    """

    symbols: np.ndarray  # int64, canonical order
    lengths: np.ndarray  # int64, non-decreasing

    def __post_init__(self) -> None:
        sym = np.asarray(self.symbols)
        lens = np.asarray(self.lengths)
        if sym.ndim != 1 or lens.ndim != 1 or sym.size != lens.size or sym.size == 0:
            raise HuffmanError("a table needs as many lengths as symbols, at least one")
        if sym.dtype.kind not in "iu" or lens.dtype.kind not in "iu":
            raise HuffmanError("table symbols and lengths must be integers")
        sym = sym.astype(np.int64)
        lens = lens.astype(np.int64)
        if (lens < 1).any() or lens.max() > _HARD_MAX_LENGTH:
            raise HuffmanError(f"code lengths must lie in 1..{_HARD_MAX_LENGTH}")
        if np.unique(sym).size != sym.size:
            raise HuffmanError("table symbols must be distinct")
        canon = np.lexsort((sym, lens))
        sym, lens = sym[canon], lens[canon]
        per_length = np.bincount(lens)
        top = int(lens.max())
        kraft = sum(int(c) << (top - k) for k, c in enumerate(per_length.tolist()) if c)
        if kraft > (1 << top):
            raise HuffmanError("code lengths violate the Kraft inequality (not a prefix code)")
        object.__setattr__(self, "symbols", sym)
        object.__setattr__(self, "lengths", lens)

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    @property
    def n_symbols(self) -> int:
        return int(self.symbols.size)

    def codes(self) -> np.ndarray:
        """Canonical code words (uint64, right-aligned), one per symbol in table order."""
        codes = np.zeros(self.n_symbols, dtype=np.uint64)
        code, prev = 0, int(self.lengths[0])
        for i, length in enumerate(self.lengths.tolist()):
            code <<= length - prev
            codes[i] = code
            code += 1
            prev = length
        return codes

    def code_of(self) -> dict[int, str]:
        """``{symbol: '0101'}``, for reading and for tests."""
        return {
            int(s): format(int(c), f"0{int(k)}b")
            for s, c, k in zip(self.symbols, self.codes(), self.lengths)
        }

    def encoded_bits(self, symbols: np.ndarray, counts: np.ndarray) -> int:
        """Exact bitstream length of data with these symbol counts (before byte padding)."""
        pos = self._positions(np.asarray(symbols, dtype=np.int64))
        return int((self.lengths[pos] * np.asarray(counts, dtype=np.int64)).sum())

    def _positions(self, values: np.ndarray) -> np.ndarray:
        """Index in the table of each value; a clear error for a value the table lacks."""
        by_symbol = np.argsort(self.symbols, kind="stable")
        sorted_sym = self.symbols[by_symbol]
        where = np.searchsorted(sorted_sym, values)
        where = np.minimum(where, sorted_sym.size - 1)
        missing = sorted_sym[where] != values
        if missing.any():
            bad = values[missing][:5].tolist()
            raise HuffmanError(f"symbols not in the Huffman table: {bad}")
        return by_symbol[where]

    # --- serialisation -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The stored table: the denser of a length-per-value range and a sparse symbol list.

        Header ``<format u8, max_length u8, n_symbols u32>``; lengths are packed with
        ``ceil(log2(max_length + 1))`` bits each. Dense: ``int64`` first symbol, ``u32`` span,
        then one length per value of the span (0 = absent). Sparse: the lengths in ascending
        symbol order, then the first symbol and the gaps between consecutive symbols as
        zigzag LEB128 varints.
        """
        dense, sparse = self._dense_bytes(), self._sparse_bytes()
        return dense if dense is not None and len(dense) <= len(sparse) else sparse

    @property
    def size_bits(self) -> int:
        """Exact size of the stored table, in bits."""
        return 8 * len(self.to_bytes())

    def _width(self) -> int:
        return max(1, int(self.max_length).bit_length())

    def _by_symbol(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.symbols, kind="stable")
        return self.symbols[order], self.lengths[order]

    def _dense_bytes(self) -> bytes | None:
        sym, lens = self._by_symbol()
        span = int(sym[-1]) - int(sym[0]) + 1
        if span > 64 * self.n_symbols + 64:
            return None  # far larger than the sparse form (and the span may not fit u32)
        full = np.zeros(span, dtype=np.int64)
        full[sym - sym[0]] = lens
        head = _HEADER.pack(_FORMAT_DENSE, self.max_length, self.n_symbols)
        return head + struct.pack("<qI", int(sym[0]), span) + _pack_uints(full, self._width())

    def _sparse_bytes(self) -> bytes:
        sym, lens = self._by_symbol()
        head = _HEADER.pack(_FORMAT_SPARSE, self.max_length, self.n_symbols)
        values = sym.tolist()
        gaps = values[:1] + [b - a for a, b in zip(values, values[1:])]
        return head + _pack_uints(lens, self._width()) + b"".join(_varint(g) for g in gaps)

    @classmethod
    def from_bytes(cls, data) -> HuffmanTable:
        """Inverse of :meth:`to_bytes` (accepts bytes, a uint8 array or a uint8 tensor)."""
        buf = _as_bytes(data)
        if len(buf) < _HEADER.size:
            raise HuffmanError("Huffman table is truncated (no header)")
        fmt, max_length, n = _HEADER.unpack_from(buf, 0)
        if not 1 <= max_length <= _HARD_MAX_LENGTH or n == 0:
            raise HuffmanError("Huffman table header is corrupt")
        width = max(1, max_length.bit_length())
        off = _HEADER.size
        if fmt == _FORMAT_DENSE:
            if len(buf) < off + 12:
                raise HuffmanError("Huffman table is truncated")
            first, span = struct.unpack_from("<qI", buf, off)
            off += 12
            full = _unpack_uints(buf[off:], width, span)
            present = np.flatnonzero(full)
            if present.size != n:
                raise HuffmanError("Huffman table lists a different number of symbols")
            return cls(symbols=present.astype(np.int64) + first, lengths=full[present])
        if fmt == _FORMAT_SPARSE:
            lens = _unpack_uints(buf[off:], width, n)
            off += (n * width + 7) // 8
            symbols, value = [], 0
            for _ in range(n):
                gap, off = _read_varint(buf, off)
                value += gap
                symbols.append(value)
            if not -(1 << 63) <= min(symbols) <= max(symbols) < (1 << 63):
                raise HuffmanError("Huffman table is corrupt (symbol outside int64)")
            return cls(symbols=np.array(symbols, dtype=np.int64), lengths=lens)
        raise HuffmanError(f"unknown Huffman table format {fmt}")

    def to_tensor(self) -> torch.Tensor:
        """The stored table as a uint8 tensor (what goes into safetensors)."""
        return torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8).clone()


def table_from_counts(symbols, counts, max_length: int | None = MAX_LENGTH) -> HuffmanTable:
    """The canonical Huffman table of symbols occurring ``counts`` times."""
    sym = _as_int_array(symbols)
    lengths = code_lengths(counts, max_length)
    if sym.size != lengths.size:
        raise HuffmanError("symbols and counts differ in length")
    return HuffmanTable(symbols=sym, lengths=lengths)


def build_table(values, max_length: int | None = MAX_LENGTH) -> HuffmanTable:
    """The canonical Huffman table of the symbols in ``values``."""
    symbols, counts = symbol_counts(values)
    return table_from_counts(symbols, counts, max_length)


def encode(values, table: HuffmanTable) -> tuple[np.ndarray, int]:
    """Pack ``values`` MSB-first into a uint8 array; returns ``(stream, n_bits)``.

    The last byte is padded with zero bits; ``n_bits`` is the exact payload length.
    """
    v = _as_int_array(values)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8), 0
    pos = table._positions(v)
    lens = table.lengths[pos]
    codes = table.codes()[pos]
    n_bits = int(lens.sum())
    ends = np.cumsum(lens)
    starts = ends - lens
    bits = np.zeros(n_bits, dtype=np.uint8)
    for k in range(table.max_length):
        m = lens > k
        if not m.any():
            break
        shift = (lens[m] - 1 - k).astype(np.uint64)
        bits[starts[m] + k] = ((codes[m] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits), n_bits


def decode(stream, table: HuffmanTable, n_symbols: int) -> np.ndarray:
    """Decode exactly ``n_symbols`` symbols from an MSB-first stream (int64 array).

    Vectorised: the code length starting at every bit position is read at once from a
    ``max_length``-bit window (canonical thresholds, one per length); the chain of code starts
    ``p -> p + len(p)`` is then followed by pointer doubling, ``log2(n)`` gathers.
    """
    if not isinstance(n_symbols, (int, np.integer)) or n_symbols < 0:
        raise HuffmanError(f"n_symbols must be a non-negative integer, got {n_symbols!r}")
    n_symbols = int(n_symbols)
    data = np.frombuffer(_as_bytes(stream), dtype=np.uint8)
    if n_symbols == 0:
        return np.zeros(0, dtype=np.int64)
    n_bits = data.size * 8
    if n_bits == 0:
        raise HuffmanError("empty Huffman stream for a non-empty tensor")
    L = table.max_length
    lens_per_len = np.bincount(table.lengths, minlength=L + 1)
    # Canonical first code and symbol offset of each length 1..L.
    first = np.zeros(L + 2, dtype=np.int64)
    offset = np.zeros(L + 2, dtype=np.int64)
    code, off = 0, 0
    for length in range(1, L + 1):
        first[length], offset[length] = code, off
        code = (code + int(lens_per_len[length])) << 1
        off += int(lens_per_len[length])
    limits = np.array(
        [(int(first[k]) + int(lens_per_len[k])) << (L - k) for k in range(1, L + 1)],
        dtype=np.uint64,
    )
    # The L-bit window at every bit position, from 64-bit big-endian words at byte offsets.
    padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    words = np.lib.stride_tricks.sliding_window_view(padded, 8)[: data.size]
    words = np.ascontiguousarray(words).view(">u8").reshape(-1).astype(np.uint64)
    p = np.arange(n_bits, dtype=np.int64)
    window = (words[p >> 3] << (p & 7).astype(np.uint64)) >> np.uint64(64 - L)
    length_at = np.searchsorted(limits, window, side="right") + 1  # L + 1: no code matches
    del words
    # Follow the chain of code starts by pointer doubling; position n_bits is a sink.
    step = np.minimum(p + np.minimum(length_at, L), n_bits).astype(np.int64)
    jump = np.append(step, n_bits)
    starts = np.zeros(1, dtype=np.int64)
    while starts.size < n_symbols:
        starts = np.concatenate([starts, jump[starts]])
        if starts.size < n_symbols:
            jump = jump[jump]
    starts = starts[:n_symbols]
    if starts[-1] >= n_bits:
        raise HuffmanError(f"Huffman stream ends before {n_symbols} symbols were decoded")
    lens = length_at[starts]
    if (lens > L).any():
        raise HuffmanError("Huffman stream holds a bit pattern that is no code of the table")
    if int(starts[-1] + lens[-1]) > n_bits:
        raise HuffmanError(f"Huffman stream ends before {n_symbols} symbols were decoded")
    codes = window[starts] >> (L - lens).astype(np.uint64)
    index = offset[lens] + codes.astype(np.int64) - first[lens]
    return table.symbols[index]


def canonical_constants(table: HuffmanTable) -> tuple[np.ndarray, np.ndarray]:
    """Decoding constants of a canonical code with longest length ``L``.

    ``limits[k-1]``: one past the largest ``L``-bit window that starts with a code of length at
    most ``k``, so a window's code length is ``searchsorted(limits, window, "right") + 1``
    (``L + 1``: no code matches). ``base[k]``: the table index of the first code of length
    ``k`` minus that code's value, so a code's index is ``base[k] + code``.
    """
    L = table.max_length
    per_length = np.bincount(table.lengths, minlength=L + 1)
    limits = np.zeros(L, dtype=np.uint64)
    base = np.zeros(L + 2, dtype=np.int64)
    code, index = 0, 0
    for k in range(1, L + 1):
        base[k] = index - code
        limits[k - 1] = (code + int(per_length[k])) << (L - k)
        code = (code + int(per_length[k])) << 1
        index += int(per_length[k])
    base[L + 1] = table.n_symbols  # no code: reads the padding symbol
    return limits, base


LUT_BITS = 12
"""Bits of the first-level table of :func:`decode_chunks` (codes longer take a slow path)."""


def _first_level(table: HuffmanTable, limits: np.ndarray, base: np.ndarray, k: int):
    """Length (0 when longer than ``k``) and symbol of the code at the top of every k-bit window."""
    L = table.max_length
    window = np.arange(1 << k, dtype=np.uint64) << np.uint64(L - k)
    length = np.searchsorted(limits, window, side="right") + 1
    short = length <= k
    length = np.where(short, length, 0)
    k_eff = np.where(short, length, 1)
    index = base[k_eff] + (window >> (L - k_eff).astype(np.uint64)).astype(np.int64)
    symbol = np.where(short, table.symbols[np.where(short, index, 0)], 0)
    return length.astype(np.int64), symbol


def symbol_lengths(values, table: HuffmanTable) -> np.ndarray:
    """Code length of every value (int64, same shape): where each one's code ends in a stream."""
    v = _as_int_array(values)
    return table.lengths[table._positions(v.reshape(-1))].reshape(v.shape)


def chunk_starts(values: np.ndarray, table: HuffmanTable, chunk: int) -> np.ndarray:
    """Bit offset at which every chunk of ``chunk`` consecutive values starts in ``encode``'s
    stream of ``values`` (flattened): the table that makes the chunks decodable on their own."""
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise HuffmanError(f"chunk must be a positive integer, got {chunk!r}")
    lens = symbol_lengths(values, table).reshape(-1)
    ends = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lens)])
    return ends[np.arange(0, lens.size, int(chunk))]


def decode_chunks(
    stream, table: HuffmanTable, starts, length: int, lut_bits: int = LUT_BITS
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``length`` symbols from each bit offset of ``starts``, all chunks in lockstep.

    One step decodes one symbol of every chunk: a ``lut_bits`` window at each chunk's position
    looks its code up in a first-level table; the few longer codes go through the canonical
    thresholds. Work is vectorised over chunks, so the Python loop runs ``length`` times
    whatever the number of chunks. Returns ``(symbols (n_chunks, length), ends)`` (``symbols`` a
    transposed view), ``ends`` the bit position after each chunk's last code, which the caller
    checks against the next chunk's start. A bit pattern that is no code raises
    ``HuffmanError``; reading past the stream gives an end beyond it.
    """
    data = np.frombuffer(_as_bytes(stream), dtype=np.uint8)
    start = np.array(starts, dtype=np.int64).reshape(-1)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise HuffmanError(f"length must be a non-negative integer, got {length!r}")
    out = np.empty((int(length), start.size), dtype=np.int64)
    if start.size == 0 or length == 0:
        return out.T, start
    if data.size == 0:
        raise HuffmanError("empty Huffman stream for a non-empty tensor")
    if (start < 0).any():
        raise HuffmanError("Huffman chunk offsets must not be negative")
    L = table.max_length
    limits, base = canonical_constants(table)
    k = min(int(lut_bits), L)
    lut_len, lut_sym = _first_level(table, limits, base, k)
    lut_len = lut_len.astype(np.uint64)
    symbols = np.append(table.symbols, 0)
    # the 64-bit big-endian word at every byte offset, then one of zeros read past the end
    padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    words = np.lib.stride_tricks.sliding_window_view(padded, 8)[: data.size + 1]
    words = np.ascontiguousarray(words).view(">u8").reshape(-1).astype(np.uint64)
    last, seven, three = np.uint64(data.size), np.uint64(7), np.uint64(3)
    top_k, top_l = np.uint64(64 - k), np.uint64(64 - L)
    p = np.minimum(start, 8 * data.size).astype(np.uint64)
    bad = False
    for j in range(int(length)):
        word = words[np.minimum(p >> three, last)] << (p & seven)
        w = word >> top_k
        n = lut_len[w]
        out[j] = lut_sym[w]
        slow = np.flatnonzero(n == 0)
        if slow.size:  # codes longer than the first-level table
            v = word[slow] >> top_l
            ln = np.searchsorted(limits, v, side="right") + 1
            bad = bad or bool((ln > L).any())
            ln = np.minimum(ln, L)
            index = base[ln] + (v >> (L - ln).astype(np.uint64)).astype(np.int64)
            out[j, slow] = symbols[np.minimum(index, table.n_symbols)]
            n[slow] = ln
        p += n
    if bad:
        raise HuffmanError("Huffman stream holds a bit pattern that is no code of the table")
    ends = p.astype(np.int64) + (start - np.minimum(start, 8 * data.size))
    return out.T, ends


def _as_bytes(data) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise HuffmanError(f"a Huffman stream tensor must be uint8, got {data.dtype}")
        return data.detach().cpu().contiguous().numpy().tobytes()
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        raise HuffmanError(f"a Huffman stream array must be uint8, got {arr.dtype}")
    return arr.tobytes()


def _pack_uints(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers at ``width`` bits each, MSB-first, padded to a byte."""
    v = np.asarray(values, dtype=np.uint64)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((v[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_uints(buf: bytes, width: int, count: int) -> np.ndarray:
    need = (count * width + 7) // 8
    if len(buf) < need:
        raise HuffmanError("Huffman table is truncated")
    bits = np.unpackbits(np.frombuffer(buf[:need], dtype=np.uint8))[: count * width]
    weights = (1 << np.arange(width - 1, -1, -1)).astype(np.int64)
    return bits.reshape(count, width).astype(np.int64) @ weights


def _varint(value: int) -> bytes:
    """Zigzag LEB128 of a Python integer: small magnitudes of either sign take one byte."""
    z = 2 * value if value >= 0 else -2 * value - 1
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, off: int) -> tuple[int, int]:
    z, shift = 0, 0
    while True:
        if off >= len(buf):
            raise HuffmanError("Huffman table is truncated (varint)")
        byte = buf[off]
        off += 1
        z |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 77:
            raise HuffmanError("Huffman table is corrupt (varint too long)")
    value = z // 2 if z % 2 == 0 else -(z + 1) // 2
    return value, off


def mean_code_length(table: HuffmanTable, symbols, counts) -> float:
    """Average code length in bits per symbol (no table, no padding)."""
    total = int(np.asarray(counts).sum())
    return table.encoded_bits(np.asarray(symbols), np.asarray(counts)) / max(1, total)
