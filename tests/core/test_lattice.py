"""Lattice routines against brute force and against each other."""

from __future__ import annotations

import itertools

import pytest
import torch

import latticequant as lq


def _basis(n: int, seed: int, m: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m or n, n, generator=g, dtype=torch.float64)


def _brute_force(
    R: torch.Tensor, u: torch.Tensor, center: torch.Tensor, radius: int, lo=None, hi=None
):
    best, best_z = float("inf"), None
    ranges = [range(int(c) - radius, int(c) + radius + 1) for c in center.tolist()]
    for z in itertools.product(*ranges):
        zt = torch.tensor(z, dtype=torch.float64)
        if lo is not None and ((zt < lo) | (zt > hi)).any():
            continue
        dist = float(((R @ (zt - u)) ** 2).sum())
        if dist < best:
            best, best_z = dist, zt
    return best, best_z


@pytest.mark.parametrize("seed", range(5))
def test_nearest_plane_residual_in_the_fundamental_box(seed):
    n = 7
    R = torch.linalg.qr(_basis(n, seed))[1]
    u = torch.randn(20, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    z = lq.nearest_plane(R, u)
    assert torch.equal(z, z.round())
    # the Gram-Schmidt coordinates of the residual lie in [-1/2, 1/2]: (R (z-u))_i / R_ii
    gs = (R @ (z - u).T).T / torch.diagonal(R)
    assert gs.abs().max() <= 0.5 + 1e-12
    # hence the distance is at most the bound with unit scales
    dist = ((R @ (z - u).T) ** 2).sum(0)
    bound = 0.25 * float((torch.diagonal(R) ** 2).sum())
    assert (dist <= bound + 1e-12).all()
    assert (dist > 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_enumeration_finds_the_brute_force_optimum(seed):
    n = 4
    B = _basis(n, seed) + 0.9 * torch.eye(n, dtype=torch.float64)
    R = torch.linalg.qr(B)[1]
    R = R * torch.sign(torch.diagonal(R))[:, None]
    u = torch.randn(n, generator=torch.Generator().manual_seed(seed + 50), dtype=torch.float64) * 3
    z = lq.cvp_enumerate(R, u)
    best, _ = _brute_force(R, u, lq.nearest_plane(R, u), radius=3)
    assert abs(float(((R @ (z - u)) ** 2).sum()) - best) <= 1e-9 * max(best, 1)
    # and never worse than Babai's point
    zb = lq.nearest_plane(R, u)
    assert float(((R @ (z - u)) ** 2).sum()) <= float(((R @ (zb - u)) ** 2).sum()) + 1e-12


def test_enumeration_respects_a_box():
    n = 4
    R = torch.linalg.qr(_basis(n, 3))[1]
    R = R * torch.sign(torch.diagonal(R))[:, None]
    u = torch.tensor([4.2, -1.3, 0.4, 7.9], dtype=torch.float64)
    z = lq.cvp_enumerate(R, u, lo=0.0, hi=3.0)
    assert (z >= 0).all() and (z <= 3).all()
    best, _ = _brute_force(R, u, torch.full((n,), 1.0), radius=2, lo=0.0, hi=3.0)
    assert abs(float(((R @ (z - u)) ** 2).sum()) - best) <= 1e-9 * max(best, 1)


def _textbook_nearest_plane(B: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Babai's nearest plane on the columns of B as in the textbook, with no triangular factor:
    classical Gram-Schmidt, then for k = n-1 .. 0 round the coefficient of the residual on b*_k
    and subtract that multiple of b_k."""
    n = B.shape[1]
    Bs = B.clone()
    for k in range(n):
        for j in range(k):
            Bs[:, k] -= (B[:, k] @ Bs[:, j]) / (Bs[:, j] @ Bs[:, j]) * Bs[:, j]
    r, z = y.clone(), [0] * n
    for k in range(n - 1, -1, -1):
        z[k] = round(float((r @ Bs[:, k]) / (Bs[:, k] @ Bs[:, k])))
        r = r - z[k] * B[:, k]
    return torch.tensor(z, dtype=torch.long)


@pytest.mark.parametrize("seed", range(3))
def test_babai_cvp_general_basis_equals_textbook_nearest_plane(seed):
    B = _basis(6, seed + 1, m=9)
    y = torch.randn(9, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) * 4
    z = lq.babai_cvp(B, y)
    assert torch.equal(z, _textbook_nearest_plane(B, y))
    # and the triangular decode through the Cholesky factor of the Gram matrix agrees
    R = torch.linalg.cholesky(B.T @ B).mT
    u = torch.linalg.lstsq(B, y[:, None]).solution[:, 0]
    assert torch.equal(z, lq.nearest_plane(R, u).long())
    # with LLL: the textbook decode on the reduced basis, mapped back by T
    A, T = lq.lll_reduce(B)
    assert torch.equal(lq.babai_cvp(B, y, lll=True), T @ _textbook_nearest_plane(A, y))


@pytest.mark.parametrize("seed", range(4))
def test_lll_reduces_and_stays_on_the_lattice(seed):
    n = 6
    g = torch.Generator().manual_seed(seed)
    # a skewed basis of a nice lattice: B = G M with unimodular M
    G = torch.randn(n, n, generator=g, dtype=torch.float64)
    M = torch.eye(n, dtype=torch.float64)
    for _ in range(12):
        i, j = torch.randint(0, n, (2,), generator=g).tolist()
        if i != j:
            M[:, i] += torch.randint(-3, 4, (1,), generator=g).item() * M[:, j]
    B = G @ M
    A, T = lq.lll_reduce(B)
    assert abs(round(float(torch.linalg.det(T.double())))) == 1
    torch.testing.assert_close(A, B @ T.double(), rtol=0, atol=1e-8)
    Qr, Rr = torch.linalg.qr(A)
    mu = (Rr / torch.diagonal(Rr)[:, None]).T
    Bn = torch.diagonal(Rr) ** 2
    strict = torch.tril(mu, -1)
    assert strict.abs().max() <= 0.5 + 1e-9
    for k in range(1, n):
        assert Bn[k] >= (0.75 - mu[k, k - 1] ** 2) * Bn[k - 1] - 1e-9
    # LLL + Babai returns a lattice point within the reduced basis's Babai radius
    y = torch.randn(n, generator=g, dtype=torch.float64) * 10
    z = lq.babai_cvp(B, y, lll=True)
    dist = float(((B @ z.double() - y) ** 2).sum())
    assert dist <= float(0.25 * Bn.sum()) + 1e-9


def test_bad_bases_are_refused():
    with pytest.raises(ValueError, match="upper triangular"):
        lq.nearest_plane(torch.ones(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="full column rank"):
        lq.lll_reduce(torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="coordinates"):
        lq.nearest_plane(torch.eye(3), torch.zeros(4))
