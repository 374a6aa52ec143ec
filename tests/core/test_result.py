"""The losses every quantizer reports, on layers wider and taller than the blocks they are
computed in, against the direct float64 quadratic form."""

from __future__ import annotations

import torch
from cases import correlated_hessian, weights
from core_reference import dequantized, direct_loss

import latticequant as lq
from latticequant.core.result import LOSS_COLUMNS, LOSS_ROWS, row_losses


def test_row_losses_in_column_blocks():
    d = 2 * LOSS_COLUMNS + 37
    W = weights(5, d, seed=1)
    H = correlated_hessian(d, seed=1)
    Q = W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=W.dtype)
    want = direct_loss(W, H, Q)
    torch.testing.assert_close(row_losses(W, H, Q), want, rtol=1e-11, atol=0)
    got32 = row_losses(W, H.float(), Q)  # a float32 H read in W - Q's dtype, block by block
    assert got32.dtype == torch.float64
    torch.testing.assert_close(got32, direct_loss(W, H.float().double(), Q), rtol=1e-11, atol=0)


def test_projected_loss_in_row_blocks():
    """GPTQ's loss comes from the decomposition on the damped lattice, block of rows by block
    of rows; it must equal the quadratic form of the codes it returns."""
    W = weights(2 * LOSS_ROWS + 9, 64, seed=3)
    H = correlated_hessian(64, seed=3)
    r = lq.gptq_quantize(W, H, lq.QuantConfig(bits=3, group_size=16, order="act"))
    torch.testing.assert_close(r.loss, direct_loss(W, H, dequantized(r)), rtol=1e-9, atol=1e-12)
