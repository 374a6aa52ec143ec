"""Refinement: coordinate descent never raises the loss and ends where no single move helps
(brute force over every single move); the scale step matches a float64 least-squares solve."""

from __future__ import annotations

import pytest
import torch
from cases import correlated_hessian, weights
from core_reference import direct_loss

import latticequant as lq
from latticequant.core.grid import dequantize
from latticequant.core.refine import coordinate_descent, refit_scales


def _start(sym=False, bits=3, group_size=8, d=24, rows=10, seed=0, quantize=lq.gptq_quantize):
    W, H = weights(rows, d, seed=seed), correlated_hessian(d, seed=seed)
    cfg = lq.QuantConfig(bits=bits, group_size=group_size, sym=sym, order="act")
    return W, H, cfg, quantize(W, H, cfg)


def _loss(W, H, codes, scales, zeros, g_idx):
    return direct_loss(W, H, dequantize(codes.double(), scales.double(), zeros.double(), g_idx))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_coordinate_descent_ends_where_no_single_move_helps(sym, bits):
    W, H, cfg, r = _start(sym=sym, bits=bits, seed=bits)
    before = _loss(W, H, r.codes, r.scales, r.zeros, r.g_idx)
    codes, sweeps = coordinate_descent(W, H, r.codes, r.scales, r.zeros, r.g_idx, cfg, 50)
    assert sweeps < 50  # converged: its last sweep moved nothing
    after = _loss(W, H, codes, r.scales, r.zeros, r.g_idx)
    assert torch.all(after <= before * (1 + 1e-12))
    assert int(codes.min()) >= 0 and int(codes.max()) <= cfg.maxq
    # brute force: every row, every column, every other code in the box
    for j in range(W.shape[1]):
        for value in range(cfg.maxq + 1):
            moved = codes.clone()
            moved[:, j] = value
            trial = _loss(W, H, moved, r.scales, r.zeros, r.g_idx)
            assert torch.all(trial >= after * (1 - 1e-12) - 1e-15), (j, value)


@pytest.mark.parametrize("sweeps", [1, 2, 5])
def test_every_sweep_lowers_or_keeps_the_loss(sweeps):
    W, H, cfg, r = _start(seed=3, rows=16, d=40)
    losses = [_loss(W, H, r.codes, r.scales, r.zeros, r.g_idx)]
    codes = r.codes
    for _ in range(sweeps):
        codes, _ = coordinate_descent(W, H, codes, r.scales, r.zeros, r.g_idx, cfg, 1, block=7)
        losses.append(_loss(W, H, codes, r.scales, r.zeros, r.g_idx))
    for a, b in zip(losses, losses[1:]):
        assert torch.all(b <= a * (1 + 1e-12))
    assert float(losses[-1].sum()) < float(losses[0].sum())


def test_scale_step_matches_a_float64_least_squares_solve():
    W, H, cfg, r = _start(sym=True, seed=4, d=32, group_size=8)
    X = torch.linalg.cholesky(H).mT  # H = X^T X: the loss is ||X (w - A s)||^2
    s, _ = refit_scales(W, H, r.codes, r.scales, r.zeros, r.g_idx, cfg, scale_dtype=torch.float64)
    for row in range(W.shape[0]):
        A = torch.zeros(W.shape[1], r.scales.shape[1], dtype=torch.float64)
        A[torch.arange(W.shape[1]), r.g_idx] = r.codes[row].double() - r.zeros[row, r.g_idx]
        ref = torch.linalg.lstsq(X @ A, X @ W[row]).solution
        old = direct_loss(W[row : row + 1], H, (A @ r.scales[row])[None])
        new = direct_loss(W[row : row + 1], H, (A @ ref)[None])
        if bool(new < old):
            torch.testing.assert_close(s[row], ref, rtol=1e-8, atol=1e-12)
        else:
            assert torch.equal(s[row], r.scales[row])


@pytest.mark.parametrize("sym", [False, True])
def test_scale_step_never_raises_the_loss_and_stores_integer_offsets(sym):
    W, H, cfg, r = _start(sym=sym, seed=6, d=40, rows=20)
    scales16 = r.scales.half().double()
    before = _loss(W, H, r.codes, scales16, r.zeros, r.g_idx)
    s, z = refit_scales(W, H, r.codes, scales16, r.zeros, r.g_idx, cfg, min_zero=1)
    after = _loss(W, H, r.codes, s, z, r.g_idx)
    assert torch.all(after <= before)
    assert float(after.sum()) < float(before.sum())
    assert torch.equal(s, s.half().double())  # float16 values, as stored
    assert torch.equal(z, z.round()) and int(z.min()) >= (1 if not sym else 0)
    if sym:
        assert torch.equal(z, r.zeros)


@pytest.mark.parametrize(
    "quantize",
    [lq.rtn_quantize, lq.gptq_quantize, lq.babai_quantize,
     lambda W, H, c: lq.kbest_quantize(W, H, c, beam=4)],
)  # fmt: skip
def test_refine_composes_with_every_decoder(quantize):
    W, H, cfg, r = _start(seed=8, d=32, rows=12, quantize=quantize)
    stored = _loss(W, H, r.codes, r.scales.half(), r.zeros, r.g_idx)
    out, stats = lq.refine(W, H, r, cfg, steps=("cd", "scales"), sweeps=3, rounds=3)
    assert stats["loss_before_refine"] == pytest.approx(float(stored.sum()), rel=1e-12)
    final = direct_loss(W, H, out.Q)
    torch.testing.assert_close(out.loss, final, rtol=1e-9, atol=1e-12)
    assert torch.all(final <= stored * (1 + 1e-12))
    removed = stats["refine_cd_removed"] + stats["refine_scales_removed"]
    assert removed == pytest.approx(float(stored.sum() - final.sum()), rel=1e-9, abs=1e-12)
    assert removed > 0
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) <= cfg.maxq


def test_refine_refuses_unknown_steps():
    W, H, cfg, r = _start()
    with pytest.raises(ValueError, match="refine steps"):
        lq.refine(W, H, r, cfg, steps=("cd", "polish"))
    with pytest.raises(ValueError, match="sweeps"):
        lq.refine(W, H, r, cfg, sweeps=0)
    with pytest.raises(ValueError, match="refine must be"):
        lq.QuantConfig(refine="cd,polish")
