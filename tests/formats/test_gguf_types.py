"""GGUF grids: llama.cpp's bytes reproduced, ggml's dequantizer agreeing bit for bit, exact
block round trips, the nearest-level rounding a decoder uses."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from latticequant.formats import FormatError
from latticequant.formats.gguf import (
    TYPES,
    GGMLType,
    GgufGrid,
    codebook,
    dequantize,
    fit_grid,
    levels,
    nearest_codes,
    pack,
    quantize_reference,
    scales_offsets,
    unpack,
)

ALL = list(TYPES)
REFERENCE = np.load(Path(__file__).parent / "data" / "gguf_reference.npz")
#: Types that gguf-py quantizes itself (its numpy port of the reference quantizers).
GGUF_QUANTIZES = [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_0, GGMLType.Q4_1]


def gguf_type(t: GGMLType):
    return getattr(gguf.GGMLQuantizationType, t.name, None)


def weights(t: GGMLType, rows: int = 4, seed: int = 0) -> np.ndarray:
    """Gaussian rows of two blocks, each row with its own size."""
    rng = np.random.default_rng(seed)
    cols = 2 * TYPES[t].block_size
    return (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)


def random_grid(t: GGMLType, rows: int, seed: int) -> GgufGrid:
    """A grid with every stored parameter drawn at random over its whole range."""
    rng = np.random.default_rng(seed)
    info = TYPES[t]
    nb = 2
    n_sub = info.block_size // info.group_size
    fields = {}
    for name in info.params:
        per_group = name == "sc" or (name == "m" and info.m_range is not None)
        if per_group:
            lo, hi = info.sc_range if name == "sc" else info.m_range
            fields[name] = rng.integers(lo, hi + 1, (rows, nb, n_sub))
        else:
            fields[name] = (rng.standard_normal((rows, nb)) * 0.01).astype(np.float16)
    return GgufGrid(t, (rows, nb * info.block_size), **fields)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_reference_bytes_equal_ggml(t):
    """Fit plus the reference codes, packed, is what ggml's C quantizer writes (a matrix with
    Gaussian, heavy-tailed, zero, constant, positive, integer, tiny and outlier rows)."""
    codes, grid = quantize_reference(t, REFERENCE["W"])
    np.testing.assert_array_equal(pack(codes, grid), REFERENCE[t.name])


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_importance_weighted_bytes_equal_ggml(t):
    """With an importance matrix (the Hessian's diagonal) the fit is ggml's ``quantize_<type>``
    with ``quant_weights``, byte for byte; for the types that use it, it changes the grid."""
    codes, grid = quantize_reference(t, REFERENCE["W"], REFERENCE["importance"])
    np.testing.assert_array_equal(pack(codes, grid), REFERENCE[f"{t.name}/imatrix"])
    if t not in (GGMLType.Q8_0, GGMLType.Q2_0):
        assert not np.array_equal(REFERENCE[f"{t.name}/imatrix"], REFERENCE[t.name])


def test_importance_refused_when_malformed():
    W = REFERENCE["W"]
    with pytest.raises(ValueError, match="512 finite non-negative"):
        fit_grid("Q4_K", W, np.ones(256))
    with pytest.raises(ValueError, match="non-negative"):
        fit_grid("Q4_K", W, -np.ones(512))


@pytest.mark.parametrize("t", GGUF_QUANTIZES, ids=lambda t: t.name)
def test_reference_bytes_equal_gguf_quantize(t):
    W = weights(t, rows=16, seed=1)
    W[0, :32] = 0
    codes, grid = quantize_reference(t, W)
    np.testing.assert_array_equal(pack(codes, grid), gguf.quants.quantize(W, gguf_type(t)))


@pytest.mark.parametrize("t", [t for t in ALL if t != GGMLType.Q2_0], ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["reference", "random"])
def test_dequantize_equals_gguf_bit_for_bit(t, source):
    """gguf-py's dequantizer (an independent reading of the layout) gives our float32 weights
    exactly, for llama.cpp's codes and for codes and parameters drawn over their whole range."""
    if source == "reference":
        codes, grid = quantize_reference(t, weights(t, seed=2))
    else:
        grid = random_grid(t, rows=3, seed=3)
        codes = np.random.default_rng(4).integers(0, TYPES[t].maxq + 1, grid.shape)
    ours = dequantize(codes, grid)
    theirs = gguf.quants.dequantize(pack(codes, grid), gguf_type(t))
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_q2_0_dequantize_by_hand():
    """Q2_0 (not in gguf-py): ``dequantize_row_q2_0`` read byte by byte from the packed data."""
    grid = random_grid(GGMLType.Q2_0, rows=2, seed=5)
    codes = np.random.default_rng(6).integers(0, 4, grid.shape)
    data = pack(codes, grid)
    out = np.empty(grid.shape, dtype=np.float32)
    for r in range(2):
        for i in range(2):
            block = data[r, 18 * i : 18 * (i + 1)]
            d = np.float32(block[:2].view("<f2")[0])
            for j in range(64):
                q = (int(block[2 + j // 4]) >> (2 * (j % 4))) & 3
                out[r, 64 * i + j] = np.float32(q - 1) * d
    np.testing.assert_array_equal(dequantize(codes, grid), out)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_pack_unpack_round_trip(t):
    grid = random_grid(t, rows=3, seed=7)
    codes = np.random.default_rng(8).integers(0, TYPES[t].maxq + 1, grid.shape)
    data = pack(codes, grid)
    assert data.dtype == np.uint8 and data.shape == (3, 2 * TYPES[t].type_size)
    codes2, grid2 = unpack(t, data)
    np.testing.assert_array_equal(codes2, codes)
    for name in TYPES[t].params:
        a, b = getattr(grid, name), getattr(grid2, name)
        np.testing.assert_array_equal(
            a.view(np.uint16) if a.dtype == np.float16 else a,
            b.view(np.uint16) if b.dtype == np.float16 else b,
        )


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_every_byte_string_round_trips(t):
    """Every bit of a block is a field: ``pack(unpack(bytes)) == bytes`` for random bytes."""
    data = np.random.default_rng(9).integers(0, 256, (3, 2 * TYPES[t].type_size), dtype=np.uint8)
    np.testing.assert_array_equal(pack(*unpack(t, data)), data)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_reference_parameters_in_range(t):
    codes, grid = quantize_reference(t, REFERENCE["W"])
    info = TYPES[t]
    assert codes.min() >= 0 and codes.max() <= info.maxq
    if info.sc_range:
        assert info.sc_range[0] <= grid.sc.min() and grid.sc.max() <= info.sc_range[1]
    if info.m_range:
        assert info.m_range[0] <= grid.m.min() and grid.m.max() <= info.m_range[1]
    assert np.isfinite(grid.d.astype(np.float32)).all()


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_nearest_codes_are_nearest(t):
    """On llama.cpp's grid, rounding to the nearest level is never worse than llama.cpp's own
    codes, weight by weight, and agrees with them almost everywhere."""
    W = weights(t, rows=8, seed=10)
    ref, grid = quantize_reference(t, W)
    near = nearest_codes(W, grid)
    err_near = np.abs(dequantize(near, grid).astype(np.float64) - W)
    err_ref = np.abs(dequantize(ref, grid).astype(np.float64) - W)
    assert (err_near <= err_ref + 1e-6 * np.abs(W).max()).all()
    assert (near == ref).mean() > 0.97


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_levels_and_scales_offsets(t):
    grid = fit_grid(t, weights(t, seed=11))
    lv = levels(grid)
    info = TYPES[t]
    assert lv.shape == (4, grid.n_groups, info.maxq + 1)
    z = np.random.default_rng(12).integers(0, info.maxq + 1, grid.shape)
    zg = z.reshape(4, grid.n_groups, info.group_size)
    picked = np.take_along_axis(lv, zg, axis=2).reshape(grid.shape)
    np.testing.assert_array_equal(picked, dequantize(z, grid))
    s, o = scales_offsets(grid)
    book = codebook(t)
    steps = np.arange(info.maxq + 1) if book is None else book  # IQ4_NL: its 16 levels
    assert (book is None) == (t != GGMLType.IQ4_NL)
    uniform = s[..., None] * (steps - o[..., None])
    np.testing.assert_allclose(uniform, lv, rtol=1e-6, atol=1e-6 * np.abs(lv).max())


def test_refusals():
    with pytest.raises(FormatError, match="multiple of 256"):
        quantize_reference("Q4_K", np.zeros((2, 576), np.float32))
    grid = fit_grid("Q4_0", np.ones((1, 32), np.float32))
    with pytest.raises(FormatError, match="0..15"):
        pack(np.full((1, 32), 16), grid)
    with pytest.raises(FormatError, match="0..63"):
        GgufGrid(
            "Q4_K",
            (1, 256),
            d=np.ones((1, 1)),
            dmin=np.ones((1, 1)),
            sc=np.full((1, 1, 8), 64),
            m=np.zeros((1, 1, 8), int),
        )
    with pytest.raises(FormatError, match="needs dmin"):
        GgufGrid("Q2_K", (1, 256), d=np.ones((1, 1)))
    with pytest.raises(ValueError, match="unknown GGML type"):
        fit_grid("Q7_0", np.ones((1, 32), np.float32))
