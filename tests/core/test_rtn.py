"""Round-to-nearest: the baseline on the same grid."""

from __future__ import annotations

import torch
from cases import correlated_hessian, weights
from core_reference import check_result, direct_loss

import latticequant as lq


def test_rtn_is_elementwise_rounding():
    W = weights(6, 40, seed=2)
    H = correlated_hessian(40, seed=2)
    cfg = lq.QuantConfig(bits=3, group_size=16)
    r = lq.rtn_quantize(W, H, cfg)
    groups = torch.arange(40) // 16  # written out, not the package's group_index
    assert torch.equal(r.g_idx, groups)
    s, z = r.scales[:, groups], r.zeros[:, groups]
    raw = torch.round(W / s + z)
    ref = torch.clamp(raw, 0, 7)
    assert torch.equal(r.codes.double(), ref)
    assert r.clipped == int(((raw < 0) | (raw > 7)).sum())
    Qref = s * (ref - z)
    torch.testing.assert_close(r.Q, Qref, rtol=0, atol=0)
    torch.testing.assert_close(r.loss, direct_loss(W, H, Qref), rtol=1e-12, atol=0)


def test_rtn_and_gptq_share_the_static_grid():
    W = weights(6, 40, seed=3)
    H = correlated_hessian(40, seed=3)
    cfg = lq.QuantConfig(bits=4, group_size=8, order="act")
    r, g = lq.rtn_quantize(W, H, cfg), lq.gptq_quantize(W, H, cfg)
    assert torch.equal(r.scales, g.scales) and torch.equal(r.zeros, g.zeros)
    assert torch.equal(r.order, g.order)
    # RTN's bound is the Babai bound of GPTQ's decode sequence: both against the Schur loop
    D = check_result(W, H, g, g.order.flip(0))
    check_result(W, H, r, r.order.flip(0), D=D, decoded=False)


def test_rtn_loss_without_the_factorization():
    """``rtn_loss`` is the loss of the written-out rounding on the direct float64 form, with a
    grid given or fitted, on float32 and float64 Hessians and with a dead column."""
    from latticequant.core.rtn import rtn_loss

    W = weights(5, 48, seed=4)
    H = correlated_hessian(48, seed=4)
    H[7, :] = 0
    H[:, 7] = 0  # an input that never fires
    groups = torch.arange(48) // 16
    for grid in ("fitted", "given"):
        cfg = lq.QuantConfig(bits=3, group_size=16, order="act")
        r = lq.rtn_quantize(W, H, cfg)  # only for a grid to hand over
        kw = {} if grid == "fitted" else {"scales": r.scales * 1.1, "zeros": r.zeros}
        S = r.scales if grid == "fitted" else kw["scales"]
        Wd = W.clone()
        Wd[:, 7] = 0
        s, z = S[:, groups], r.zeros[:, groups]
        Qref = s * (torch.clamp(torch.round(Wd / s + z), 0, 7) - z)
        want = float(direct_loss(W, H, Qref).sum())
        for Hd in (H, H.float()):
            got = rtn_loss(W, Hd, cfg, **kw)
            assert abs(got - want) <= 1e-6 * abs(want), (grid, Hd.dtype)


def test_rtn_loss_over_several_row_blocks():
    """More rows than one block of ``rtn_loss``: the same figure as ``rtn_quantize``'s loss
    (its own grid and a given one), symmetric and asymmetric."""
    from latticequant.core.result import LOSS_ROWS
    from latticequant.core.rtn import rtn_loss

    W = weights(2 * LOSS_ROWS + 11, 64, seed=6)
    H = correlated_hessian(64, seed=6)
    for sym in (False, True):
        cfg = lq.QuantConfig(bits=3, group_size=16, sym=sym)
        g = lq.gptq_quantize(W, H, cfg)
        for kw in ({}, {"scales": g.scales, "zeros": g.zeros}):
            want = lq.rtn_quantize(W, H, cfg, **kw).proxy_loss
            assert abs(rtn_loss(W, H, cfg, **kw) - want) <= 1e-12 * want
