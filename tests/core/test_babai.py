"""GPTQ run back-to-front is Babai's nearest plane: the equivalence, to machine precision."""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import correlated_hessian, ill_conditioned_hessian, weights
from core_reference import (
    check_result,
    damped_hessian,
    dequantized,
    direct_loss,
    schur_ldl_diagonal,
)

import latticequant as lq


def _orders(d: int):
    g = torch.Generator().manual_seed(d)
    return ["natural", "reverse", "act", "min-pivot", torch.randperm(d, generator=g)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("hessian", ["correlated", "ill-conditioned"])
def test_gptq_with_order_P_equals_babai_with_P_flipped(bits, sym, hessian):
    d_out, d_in = 5, 37
    H = (
        correlated_hessian(d_in, seed=bits)
        if hessian == "correlated"
        else ill_conditioned_hessian(d_in, seed=bits, cond=1e9)
    )
    W = weights(d_out, d_in, seed=bits) * (3.0 if hessian == "ill-conditioned" else 1.0)
    cases = itertools.product([-1, 8, 16], _orders(d_in), [True, False], [6, 37, 128])
    clipped_cases = 0
    for k, (group_size, order, clip, block) in enumerate(cases):
        if k % 3:  # a third of the cross product, every value of every axis still covered
            continue
        cfg = lq.QuantConfig(
            bits=bits, sym=sym, group_size=group_size, order=order, clip=clip, block_size=block
        )
        rg = lq.gptq_quantize(W, H, cfg)
        rb = lq.babai_quantize(W, H, cfg.replace(order=rg.order.flip(0), block_size=block + 1))
        where = f"group {group_size}, order {order}, clip {clip}, block {block}"
        if isinstance(order, torch.Tensor):
            assert torch.equal(rg.order, order), where
        elif order in ("natural", "reverse"):
            natural = torch.arange(d_in)
            assert torch.equal(rg.order, natural if order == "natural" else natural.flip(0))
        assert torch.equal(rg.codes, rb.codes), where
        torch.testing.assert_close(rg.loss, rb.loss, rtol=1e-9, atol=0, msg=where)
        torch.testing.assert_close(rg.D, rb.D, rtol=1e-9, atol=0, msg=where)
        assert rg.clipped == rb.clipped and rg.overflow == rb.overflow
        # both against float64 references that share no code with the package: the literal
        # Schur loop on the damped H in basis order, the quadratic form on the undamped H
        assert rg.damp == rb.damp == cfg.damp, where  # H is positive definite: never raised
        basis = rg.order.flip(0)
        D = schur_ldl_diagonal(damped_hessian(H, cfg.damp), basis)
        check_result(W, H, rg, basis, D=D, where=f"gptq, {where}")
        check_result(W, H, rb, rb.order, D=D, where=f"babai, {where}")
        if clip:
            clipped_cases += rg.clipped > 0
        else:
            assert rg.clipped == 0, where
    # clip=False covers the bound on every row; these cover the clipped branch
    assert clipped_cases > 0


@pytest.mark.parametrize("order", ["act", "min-pivot"])
@pytest.mark.parametrize("static_groups", [True, False])
def test_named_heuristics_decode_in_the_same_sequence(order, static_groups):
    H = correlated_hessian(40, seed=11)
    W = weights(6, 40, seed=11)
    cfg = lq.QuantConfig(bits=3, group_size=16, order=order, static_groups=static_groups)
    rg, rb = lq.gptq_quantize(W, H, cfg), lq.babai_quantize(W, H, cfg)
    assert torch.equal(rb.order, rg.order.flip(0))
    assert torch.equal(rg.codes, rb.codes)
    torch.testing.assert_close(rg.targets, rb.targets, rtol=0, atol=1e-10)
    D = check_result(W, H, rg, rg.order.flip(0))
    check_result(W, H, rb, rb.order, D=D)


def test_babai_equals_textbook_nearest_plane_row_by_row():
    """The blocked, row-batched decode against ``nearest_plane`` on each row's own basis."""
    d_in = 24
    H = correlated_hessian(d_in, seed=12)
    W = weights(4, d_in, seed=12)
    cfg = lq.QuantConfig(bits=4, group_size=8, order="act", clip=False, block_size=5)
    r = lq.babai_quantize(W, H, cfg)
    Q = r.order
    Hd = H + cfg.damp * torch.diagonal(H).mean() * torch.eye(d_in, dtype=H.dtype)
    U = torch.linalg.cholesky(Hd[Q][:, Q]).mT
    for row in range(W.shape[0]):
        s = r.scales[row, r.g_idx[Q]]
        o = r.zeros[row, r.g_idx[Q]]
        u = W[row, Q] / s + o
        z = lq.nearest_plane(U * s[None, :], u)
        assert torch.equal(z, r.codes[row, Q].double())


@pytest.mark.parametrize("seed", range(6))
def test_bound_holds_on_every_row_without_clipping(seed):
    d_in = 48
    H = (
        ill_conditioned_hessian(d_in, seed=seed, cond=1e6)
        if seed % 2
        else correlated_hessian(d_in, seed=seed)
    )
    W = weights(16, d_in, seed=seed)
    for bits, gs, order in [(2, 16, "act"), (3, -1, "min-pivot"), (4, 12, "natural")]:
        cfg = lq.QuantConfig(bits=bits, group_size=gs, order=order, clip=False)
        for f in (lq.gptq_quantize, lq.babai_quantize):
            r = f(W, H, cfg)
            assert r.clipped == 0
            basis = r.order.flip(0) if f is lq.gptq_quantize else r.order
            # direct loss <= independent bound on every row, inside check_result
            check_result(W, H, r, basis, where=f"{f.__name__}, {bits} bits, {order}")
            # every code is the nearest grid point of its projected target
            s = r.scales[:, r.g_idx]
            q_err = (r.targets - dequantized(r)) / s
            assert q_err.abs().max() <= 0.5 + 1e-9


def test_clipping_is_reported():
    H = ill_conditioned_hessian(32, seed=1, cond=1e8)
    W = weights(8, 32, seed=1)
    r = lq.babai_quantize(W, H, lq.QuantConfig(bits=2, group_size=-1, order="act"))
    assert r.clipped > 0
    assert r.codes.min() >= 0 and r.codes.max() <= 3
    r2 = lq.babai_quantize(W, H, lq.QuantConfig(bits=2, group_size=-1, order="act", clip=False))
    assert r2.clipped == 0 and r2.overflow > 0


@pytest.mark.parametrize("seed", range(8))
def test_exact_cvp_below_babai_below_bound_on_tiny_lattices(seed):
    d_in = 3 + seed % 6  # 3..8
    H = correlated_hessian(d_in, n=50, seed=seed)
    W = weights(3, d_in, seed=seed)
    cfg = lq.QuantConfig(bits=3, group_size=-1, order="act", clip=False, damp=0.0)
    r = lq.babai_quantize(W, H, cfg)
    assert r.damp == 0.0
    D = check_result(W, H, r, r.order)
    U = torch.linalg.cholesky(H[r.order][:, r.order]).mT
    torch.testing.assert_close(torch.diagonal(U) ** 2, D[r.order], rtol=1e-9, atol=0)
    for row in range(3):
        s = r.scales[row, 0]
        u = W[row, r.order] / s + r.zeros[row, 0]
        R = U * s
        z_opt = lq.cvp_enumerate(R, u)
        opt = float(((R @ (z_opt - u)) ** 2).sum())
        z_babai = r.codes[row, r.order].double()
        babai = float(((R @ (z_babai - u)) ** 2).sum())
        bound = 0.25 * float((D * s * s).sum())
        assert opt <= babai * (1 + 1e-9) + 1e-12
        assert babai <= bound * (1 + 1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("quantize", [lq.gptq_quantize, lq.babai_quantize])
def test_reported_loss_equals_the_direct_quadratic_form(quantize, dtype):
    H = correlated_hessian(40, seed=21).to(dtype)
    H[3, :] = 0
    H[:, 3] = 0  # a dead column: excluded from the loss by H itself
    W = weights(8, 40, seed=21).to(dtype)
    for clip in (True, False):
        r = quantize(W, H, lq.QuantConfig(bits=3, group_size=16, order="act", clip=clip))
        direct = direct_loss(W, H, dequantized(r))
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(r.loss.double(), direct, rtol=tol, atol=tol * direct.max())
        assert torch.all(r.Q[:, 3] == 0)
        basis = r.order.flip(0) if quantize is lq.gptq_quantize else r.order
        check_result(W, H, r, basis, where=f"clip {clip}")
