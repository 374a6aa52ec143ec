"""Q2_0's Hessian-weighted scale fit against a brute force over every float16 scale."""

import numpy as np
import pytest

from latticequant.formats.gguf import GGMLType, dequantize, nearest_codes, pack, unpack
from latticequant.formats.gguf.weighted_fit import fit_q2_0

#: Every finite float16 but zero, of both signs, in float64.
_POS = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
ALL_FP16 = np.concatenate([_POS, -_POS])


def weighted_error(x: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """sum_j w_j (x_j - q_j)^2 with q_j the nearest of the four levels {-1, 0, 1, 2} d, found by
    trying all four (float64): one value per scale in ``d``."""
    levels = np.array([-1.0, 0.0, 1.0, 2.0])[None, None, :] * d[:, None, None]
    e = np.abs(x[None, :, None] - levels).min(axis=-1)
    return (w[None, :] * e * e).sum(axis=1)


def blocks(seed: int):
    """Blocks of 64 weights and importances: Gaussian, one-signed, with an outlier, tiny."""
    rng = np.random.default_rng(seed)
    for t in range(24):
        x = rng.standard_normal(64) * (0.02 if t % 2 else 1.0)
        if t % 3 == 0:
            x[rng.integers(64)] *= 6
        if t % 4 == 0:
            x = np.abs(x) * (-1 if t % 8 else 1)
        w = rng.gamma(0.5, size=64)
        yield x.astype(np.float32), w.astype(np.float32)


def test_fit_is_near_the_best_float16_scale():
    """Every float16 ``d`` tried by brute force: the fit is within 1% of the best one in each
    block (and at the best one in most), and never worse than llama.cpp's ``d = max |x|``."""
    ratios = []
    for x, w in blocks(0):
        d = fit_q2_0(x[None, :], w).d.astype(np.float64).reshape(1)
        x64, w64 = x.astype(np.float64), w.astype(np.float64)
        amax = np.abs(x64).max()
        every = weighted_error(x64, w64, ALL_FP16[np.abs(ALL_FP16) <= 2 * amax])
        ours = weighted_error(x64, w64, d)[0]
        llama = weighted_error(x64, w64, np.array([np.float16(amax)], dtype=np.float64))[0]
        assert ours <= llama * (1 + 1e-12)
        ratios.append(ours / every.min())
    assert max(ratios) < 1.01
    assert np.median(ratios) < 1.0001


def test_fit_uses_the_sign_of_d_for_one_signed_blocks():
    """A block of negative weights is best served by ``d < 0`` (levels ``{-2, -1, 0, 1} |d|``),
    one of positive weights by ``d > 0``; both far better than the ternary ``d = max |x|``."""
    x = np.linspace(0.1, 1.0, 64, dtype=np.float32)
    w = np.ones(64, dtype=np.float32)
    for sign in (1, -1):
        d = fit_q2_0(sign * x[None, :], w).d.astype(np.float64).reshape(1)
        assert np.sign(d[0]) == sign
        amax = np.array([1.0])
        assert weighted_error(sign * x, w, d)[0] < 0.5 * weighted_error(sign * x, w, amax)[0]


def test_importance_steers_the_scale():
    """A column with almost all the weight is stored almost exactly, where uniform weights
    leave it far off."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    x[0, 5] = np.float32(0.37) * np.abs(x).max()
    w = np.full(64, 1e-6, dtype=np.float32)
    w[5] = 1.0

    def error_at_5(weights):
        grid = fit_q2_0(x, weights)
        return abs(dequantize(nearest_codes(x, grid), grid)[0, 5] - x[0, 5]) / abs(x[0, 5])

    assert error_at_5(w) < 0.01
    assert error_at_5(np.ones(64)) > 0.05


def test_negative_scales_round_trip_bytes_and_nearest_levels():
    """The fitted grid (scales of both signs) packs into ``block_q2_0`` and back unchanged, and
    the rounding the decoders use picks the nearest of the four levels (brute force)."""
    rng = np.random.default_rng(4)
    W = (rng.standard_normal((6, 192)) * 0.05).astype(np.float32)
    W[:3] = -np.abs(W[:3])
    grid = fit_q2_0(W, rng.gamma(0.5, size=192))
    assert (grid.d < 0).any() and (grid.d > 0).any()
    codes = nearest_codes(W, grid)
    values = dequantize(codes, grid).astype(np.float64)
    d = np.repeat(grid.d.astype(np.float64), 64, axis=1)
    candidates = np.array([-1.0, 0.0, 1.0, 2.0])[None, None, :] * d[..., None]
    best = np.abs(W[..., None] - candidates).min(axis=-1)
    np.testing.assert_allclose(np.abs(W - values), best, rtol=0, atol=1e-7)
    codes2, grid2 = unpack(GGMLType.Q2_0, pack(codes, grid))
    np.testing.assert_array_equal(codes2, codes)
    np.testing.assert_array_equal(grid2.d.view(np.uint16), grid.d.view(np.uint16))


def test_zero_block_and_bad_importance():
    grid = fit_q2_0(np.zeros((1, 64), dtype=np.float32))
    assert grid.d[0, 0] == 0
    with pytest.raises(ValueError, match="64 finite non-negative"):
        fit_q2_0(np.ones((1, 64)), -np.ones(64))
    with pytest.raises(ValueError, match="multiple of 64"):
        fit_q2_0(np.ones((1, 32)))
