"""Round-to-nearest: the baseline on the same grid."""

from __future__ import annotations

import torch
from cases import correlated_hessian, weights

import latticequant as lq


def test_rtn_is_elementwise_rounding():
    W = weights(6, 40, seed=2)
    H = correlated_hessian(40, seed=2)
    cfg = lq.QuantConfig(bits=3, group_size=16)
    r = lq.rtn_quantize(W, H, cfg)
    s, z = r.scales[:, r.g_idx], r.zeros[:, r.g_idx]
    ref = torch.clamp(torch.round(W / s + z), 0, 7)
    assert torch.equal(r.codes.double(), ref)
    E = W - r.Q
    torch.testing.assert_close(r.loss, torch.einsum("ri,ij,rj->r", E, H, E))


def test_rtn_and_gptq_share_the_static_grid():
    W = weights(6, 40, seed=3)
    H = correlated_hessian(40, seed=3)
    cfg = lq.QuantConfig(bits=4, group_size=8, order="act")
    r, g = lq.rtn_quantize(W, H, cfg), lq.gptq_quantize(W, H, cfg)
    assert torch.equal(r.scales, g.scales) and torch.equal(r.zeros, g.zeros)
    torch.testing.assert_close(r.bound, g.bound)
