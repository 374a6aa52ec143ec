"""Grids: groups, symmetric and asymmetric offsets, min-max, MSE and Hessian-weighted scales."""

from __future__ import annotations

import pytest
import torch
from cases import weights

import latticequant as lq
from latticequant.core.grid import dequantize, fit_grid, fit_rows, group_index, n_groups


def test_groups_of_a_576_wide_layer_with_group_128():
    g = group_index(576, 128)
    sizes = torch.bincount(g).tolist()
    assert sizes == [128, 128, 128, 128, 64]
    assert n_groups(576, 128) == 5 and n_groups(576, -1) == 1
    assert torch.all(group_index(576, -1) == 0)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_minmax_grid_covers_each_row_and_codes_fit(bits, sym):
    W = weights(7, 50, seed=bits)
    cfg = lq.QuantConfig(bits=bits, group_size=16, sym=sym)
    S, Z = fit_grid(W, cfg)
    assert S.shape == (7, 4) and (S > 0).all()
    assert torch.equal(Z, Z.round()) and (Z >= 0).all() and (Z <= cfg.maxq).all()
    if sym:
        assert torch.all(Z == 2 ** (bits - 1))
    # min-max written out per group: the range widened to contain 0, mapped onto 0..maxq
    for k, a in enumerate(range(0, 50, 16)):
        block = W[:, a : a + 16]
        lo, hi = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
        if sym:
            # the reference GPTQ's rule: a row with a negative weight gets [-m, m] with
            # m = max |w|; a row without one keeps [0, max w] (so half of it is clipped)
            m = torch.maximum(-lo, hi)
            s_ref = torch.where(lo < 0, 2 * m, hi) / cfg.maxq
            torch.testing.assert_close(S[:, k], s_ref, rtol=1e-14, atol=0)
        else:
            s_ref = (hi - lo) / cfg.maxq
            torch.testing.assert_close(S[:, k], s_ref, rtol=1e-14, atol=0)
            assert torch.equal(Z[:, k], torch.round(-lo / s_ref))
    g = torch.arange(50) // 16
    r = lq.rtn_quantize(W, torch.eye(50, dtype=W.dtype), cfg)
    assert r.codes.min() >= 0 and r.codes.max() <= cfg.maxq
    # min-max never clips an asymmetric grid: RTN error at most half a step everywhere; a
    # symmetric grid only on the groups of a row that hold a negative weight
    covered = torch.ones_like(W, dtype=torch.bool)
    if sym:
        has_negative = torch.stack([(W[:, a : a + 16] < 0).any(1) for a in range(0, 50, 16)], 1)
        covered = has_negative[:, g]
        assert covered.float().mean() > 0.9
    else:
        assert r.clipped == 0
    assert ((W - r.Q).abs()[covered] <= S[:, g][covered] / 2 + 1e-12).all()
    # the grid formula written out, not the package's dequantize
    torch.testing.assert_close(r.Q, S[:, g] * (r.codes.double() - Z[:, g]), rtol=0, atol=0)
    torch.testing.assert_close(dequantize(r.codes, S, Z, g), r.Q, rtol=0, atol=0)


def test_mse_scale_is_the_best_on_its_search_grid():
    W = weights(5, 64, seed=3)
    W[0, 0] = 12.0  # an outlier that makes min-max wasteful
    cfg = lq.QuantConfig(bits=3, group_size=-1, scale_method="mse")
    s, z = fit_rows(W, cfg)

    def err(scale, zero):
        q = scale[:, None] * (
            torch.round(W / scale[:, None] + zero[:, None]).clamp(0, 7) - zero[:, None]
        )
        return (q - W).abs().pow(cfg.mse_norm).sum(1)

    s_mm, z_mm = fit_rows(W, cfg.replace(scale_method="minmax"))
    assert (err(s, z) <= err(s_mm, z_mm) + 1e-12).all()
    assert s[0] < s_mm[0]
    # brute force over the same shrink factors
    xmin, xmax = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
    best = torch.full((5,), float("inf"), dtype=W.dtype)
    for i in range(int(cfg.mse_maxshrink * cfg.mse_grid)):
        p = 1 - i / cfg.mse_grid
        sc = (p * xmax - p * xmin) / 7
        ze = torch.round(-p * xmin / sc)
        best = torch.minimum(best, err(sc, ze))
    torch.testing.assert_close(err(s, z), best)


def test_hessian_scale_is_the_best_weighted_fit_on_its_search_grid():
    W = weights(6, 48, seed=4)
    W[0, 5] = 9.0  # an outlier on a column the Hessian barely weighs
    h = torch.rand(48, dtype=W.dtype, generator=torch.Generator().manual_seed(1)) + 0.05
    h[5] = 1e-4
    cfg = lq.QuantConfig(bits=3, group_size=-1, scale_method="hessian")
    s, z = fit_rows(W, cfg, h=h)

    def err(scale, zero):  # float64 by hand, nearest code clamped to 0..7
        q = scale[:, None] * (
            torch.round(W / scale[:, None] + zero[:, None]).clamp(0, 7) - zero[:, None]
        )
        return ((q - W) ** 2 * h).sum(1)

    xmin, xmax = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
    best = torch.full((6,), float("inf"), dtype=W.dtype)
    for i in range(int(cfg.mse_maxshrink * cfg.mse_grid)):  # brute force, same candidates
        p = 1 - i / cfg.mse_grid
        sc = (p * xmax - p * xmin) / 7
        best = torch.minimum(best, err(sc, torch.round(-p * xmin / sc)))
    torch.testing.assert_close(err(s, z), best)
    s_mm, z_mm = fit_rows(W, cfg.replace(scale_method="minmax"))
    assert (err(s, z) <= err(s_mm, z_mm) + 1e-12).all()
    assert s[0] < s_mm[0] and err(s, z)[0] < 0.7 * err(s_mm, z_mm)[0]  # the outlier let go
    # with equal weights it is the squared-error search (a second implementation: "mse", norm 2)
    ones = torch.ones(48, dtype=W.dtype)
    s1, z1 = fit_rows(W, cfg, h=ones)
    s2, z2 = fit_rows(W, cfg.replace(scale_method="mse", mse_norm=2.0))
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_hessian_scale_reads_each_groups_own_diagonal():
    W = weights(4, 64, seed=6)
    h = torch.rand(64, dtype=W.dtype, generator=torch.Generator().manual_seed(2)) + 0.1
    cfg = lq.QuantConfig(bits=3, group_size=16, scale_method="hessian")
    S, Z = fit_grid(W, cfg, h=h)
    for k in range(4):
        s, z = fit_rows(
            W[:, 16 * k : 16 * (k + 1)], cfg.replace(group_size=-1), h=h[16 * k : 16 * (k + 1)]
        )
        assert torch.equal(S[:, k], s) and torch.equal(Z[:, k], z)
    with pytest.raises(ValueError, match="Hessian's diagonal"):
        fit_rows(W, cfg)
    with pytest.raises(ValueError, match="static_groups=True"):
        cfg.replace(static_groups=False)


def test_every_method_fits_the_hessian_scale_on_its_own_diagonal():
    W = weights(8, 64, seed=7)
    X = torch.randn(256, 64, dtype=W.dtype, generator=torch.Generator().manual_seed(3))
    X[:, :8] *= 10  # columns the Hessian weighs far more
    H = X.T @ X / 256
    cfg = lq.QuantConfig(bits=3, group_size=32, scale_method="hessian", order="act")
    S_ref, Z_ref = fit_grid(W, cfg, h=torch.diagonal(H).clone())
    for fn in (lq.gptq_quantize, lq.babai_quantize, lq.rtn_quantize):
        r = fn(W, H, cfg)
        assert torch.equal(r.scales, S_ref) and torch.equal(r.zeros, Z_ref), fn.__name__
    S_mse, _ = fit_grid(W, cfg.replace(scale_method="mse", mse_norm=2.0))
    assert not torch.equal(S_ref, S_mse)  # the weighting changed the grid


def test_all_zero_row_gets_a_valid_grid():
    W = torch.zeros(2, 8, dtype=torch.float64)
    r = lq.rtn_quantize(W, torch.eye(8, dtype=W.dtype), lq.QuantConfig(bits=4, group_size=4))
    assert torch.all(r.Q == 0) and torch.isfinite(r.scales).all()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("scale_method", ["minmax", "mse"])
def test_min_zero_keeps_offsets_at_one_and_still_covers_the_range(bits, scale_method):
    W = weights(40, 64, seed=bits)
    W[:10, :16] = W[:10, :16].abs()  # groups without a negative weight: offset 0 by min-max
    W[10:20, 16:32] = W[10:20, 16:32].abs() - 0.1 * W[10:20, 16:32].abs().max()  # a tiny one
    base = lq.QuantConfig(bits=bits, group_size=16, scale_method=scale_method)
    S0, Z0 = fit_grid(W, base)
    assert int(Z0.min()) == 0  # the case exists without the constraint
    S, Z = fit_grid(W, base, min_zero=1)
    assert int(Z.min()) >= 1 and int(Z.max()) <= base.maxq
    kept = Z0 >= 1  # groups that already had an offset of at least one are untouched
    assert torch.equal(S[kept], S0[kept]) and torch.equal(Z[kept], Z0[kept])
    if scale_method == "minmax":
        # float64 by hand: every weight of a refitted group lies on [-s, (maxq - 1) s]
        for k in range(4):
            block = W[:, 16 * k : 16 * (k + 1)]
            lo, hi = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
            refit = ~kept[:, k]
            s_ref = torch.maximum(hi / (base.maxq - 1), -lo)
            torch.testing.assert_close(S[refit, k], s_ref[refit], rtol=1e-14, atol=0)
            assert torch.all(Z[refit, k] == 1)
            lo_grid, hi_grid = -S[:, k] * Z[:, k], S[:, k] * (base.maxq - Z[:, k])
            assert torch.all(lo[refit] >= lo_grid[refit] - 1e-12)
            assert torch.all(hi[refit] <= hi_grid[refit] + 1e-12)
    with pytest.raises(ValueError, match="min_zero"):
        fit_grid(W, base, min_zero=1 << bits)
