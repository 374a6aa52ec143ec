"""Grids: groups, symmetric and asymmetric offsets, min-max and MSE scales."""

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
    g = group_index(50, 16)
    r = lq.rtn_quantize(W, torch.eye(50, dtype=W.dtype), cfg)
    assert r.codes.min() >= 0 and r.codes.max() <= cfg.maxq
    # min-max never clips an asymmetric grid: RTN error at most half a step everywhere
    if not sym:
        assert r.clipped == 0
        assert ((W - r.Q).abs() <= S[:, g] / 2 + 1e-12).all()
    torch.testing.assert_close(r.Q, dequantize(r.codes, S, Z, g))


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


def test_all_zero_row_gets_a_valid_grid():
    W = torch.zeros(2, 8, dtype=torch.float64)
    r = lq.rtn_quantize(W, torch.eye(8, dtype=W.dtype), lq.QuantConfig(bits=4, group_size=4))
    assert torch.all(r.Q == 0) and torch.isfinite(r.scales).all()
