"""K-best and Klein decoding: Babai's codes at beam 1, never worse than Babai, closer to the
exact box-constrained closest vector (brute-force enumeration) on tiny lattices."""

from __future__ import annotations

import pytest
import torch
from cases import correlated_hessian, ill_conditioned_hessian, weights
from core_reference import direct_loss

import latticequant as lq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 8, 16])  # 37 columns: ragged last group
@pytest.mark.parametrize("order", ["natural", "reverse", "act", "min-pivot"])
def test_beam_one_is_babai_bit_for_bit(bits, sym, group_size, order):
    W, H = weights(6, 37, seed=bits), correlated_hessian(37, seed=bits)
    for clip, block in ((True, 128), (False, 6), (True, 13)):
        cfg = lq.QuantConfig(bits=bits, group_size=group_size, sym=sym, order=order, clip=clip,
                             block_size=block)  # fmt: skip
        k = lq.kbest_quantize(W, H, cfg, beam=1)
        b = lq.babai_quantize(W, H, cfg)
        assert torch.equal(k.codes, b.codes) and torch.equal(k.scales, b.scales)
        assert torch.equal(k.order, b.order) and k.clipped == b.clipped


@pytest.mark.parametrize("hessian", [correlated_hessian, ill_conditioned_hessian])
@pytest.mark.parametrize("sym", [False, True])
def test_no_row_is_ever_worse_than_babai(hessian, sym):
    W, H = weights(24, 40, seed=5), hessian(40, seed=5)
    for bits, beam, paths in ((2, 4, 0), (3, 8, 0), (4, 2, 6), (3, 1, 8)):
        cfg = lq.QuantConfig(bits=bits, group_size=16, sym=sym, order="act", block_size=16)
        babai = direct_loss(W, H, lq.babai_quantize(W, H, cfg).Q)
        r = lq.kbest_quantize(W, H, cfg, beam=beam, klein_paths=paths, seed=1)
        loss = direct_loss(W, H, r.Q)
        assert torch.all(loss <= babai * (1 + 1e-12) + 1e-15)
        torch.testing.assert_close(r.loss, loss, rtol=1e-9, atol=1e-12)
        assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= cfg.maxq


def _exact_fraction(beam: int, seeds=range(12)) -> tuple[float, int]:
    """Rows whose decode reaches the exact box-constrained optimum (Schnorr-Euchner
    enumeration on the same damped lattice), and rows worse than Babai."""
    exact = worse = total = 0
    for seed in seeds:
        d = 3 + seed % 6  # 3..8
        H = correlated_hessian(d, n=50, seed=seed)
        W = weights(8, d, seed=seed) * 0.7
        cfg = lq.QuantConfig(bits=2, group_size=-1, order="act", damp=0.0)
        r = lq.kbest_quantize(W, H, cfg, beam=beam)
        b = lq.babai_quantize(W, H, cfg)
        U = torch.linalg.cholesky(H[r.order][:, r.order]).mT
        for row in range(W.shape[0]):
            s, o = float(r.scales[row, 0]), float(r.zeros[row, 0])
            u = W[row, r.order] / s + o
            R = U * s
            z_opt = lq.cvp_enumerate(R, u, 0, cfg.maxq)
            opt = float(((R @ (z_opt - u)) ** 2).sum())
            got = r.codes[row, r.order].double()
            dist = float(((R @ (got - u)) ** 2).sum())
            babai = float(((R @ (b.codes[row, b.order].double() - u)) ** 2).sum())
            assert dist >= opt * (1 - 1e-9) - 1e-12  # nothing beats the exact optimum
            exact += dist <= opt * (1 + 1e-9) + 1e-12
            worse += dist > babai * (1 + 1e-9) + 1e-12
            total += 1
    return exact / total, worse


def test_list_decoding_reaches_the_exact_optimum_more_often_than_babai():
    babai, _ = _exact_fraction(1)
    four, worse4 = _exact_fraction(4)
    eight, worse8 = _exact_fraction(8)
    assert worse4 == 0 and worse8 == 0
    assert babai < four <= eight
    assert eight > 0.9  # on lattices of dimension at most 8, K=8 is nearly always exact


def test_klein_paths_are_seeded_and_only_help():
    W, H = weights(16, 32, seed=9), correlated_hessian(32, seed=9)
    cfg = lq.QuantConfig(bits=2, group_size=-1, order="act")
    base = lq.kbest_quantize(W, H, cfg, beam=2)
    a = lq.kbest_quantize(W, H, cfg, beam=2, klein_paths=16, seed=3)
    again = lq.kbest_quantize(W, H, cfg, beam=2, klein_paths=16, seed=3)
    assert torch.equal(a.codes, again.codes)
    assert torch.all(a.loss <= base.loss * (1 + 1e-12))
    assert float(a.loss.sum()) < float(base.loss.sum())  # 16 paths find something on 16 rows


def test_bad_arguments_are_refused():
    W, H = weights(4, 16), correlated_hessian(16)
    with pytest.raises(ValueError, match="beam"):
        lq.kbest_quantize(W, H, lq.QuantConfig(group_size=8), beam=0)
    with pytest.raises(ValueError, match="klein_paths"):
        lq.kbest_quantize(W, H, lq.QuantConfig(group_size=8), klein_paths=-1)
    with pytest.raises(ValueError, match="static_groups"):
        lq.kbest_quantize(W, H, lq.QuantConfig(group_size=8, static_groups=False))
