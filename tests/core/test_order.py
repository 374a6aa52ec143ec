"""Orders and the LDL diagonal they induce."""

from __future__ import annotations

import pytest
import torch
from cases import correlated_hessian, ill_conditioned_hessian
from core_reference import schur_ldl_diagonal

import latticequant as lq
from latticequant.core.order import resolve_order


def schur_greedy(H: torch.Tensor) -> tuple[list[int], list[float]]:
    """The paper's Algorithm 3 (docs/theory.md §6) literally: smallest pivot, Schur step, repeat."""
    A = H.double().clone()
    left = list(range(H.shape[0]))
    order, piv = [], []
    while left:
        j = min(left, key=lambda k: float(A[k, k]))
        order.append(j)
        piv.append(float(A[j, j]))
        A = A - torch.outer(A[:, j], A[j, :]) / A[j, j]
        left.remove(j)
    return order, piv


@pytest.mark.parametrize("d", [5, 33, 130])
def test_min_pivot_matches_the_literal_algorithm(d):
    H = correlated_hessian(d, seed=d)
    Q, piv = lq.min_pivot_order(H, block=16)
    order, ref = schur_greedy(H)
    assert Q.tolist() == order
    torch.testing.assert_close(piv, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=0)
    # the pivots are the LDL diagonal in that order
    D = lq.ldl_diagonal(H, Q)
    torch.testing.assert_close(D[Q], piv, rtol=1e-9, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_min_pivot_trace_no_larger_than_act_order(seed):
    d = 64
    H = correlated_hessian(d, seed=seed) if seed % 2 else ill_conditioned_hessian(d, seed=seed)
    Hd = H + 0.01 * torch.diagonal(H).mean() * torch.eye(d, dtype=H.dtype)
    Q_act, Q_min = resolve_order("act", Hd, "babai"), resolve_order("min-pivot", Hd, "babai")
    D_act, D_min = lq.ldl_diagonal(Hd, Q_act), lq.ldl_diagonal(Hd, Q_min)
    torch.testing.assert_close(D_act, schur_ldl_diagonal(Hd, Q_act), rtol=1e-9, atol=0)
    torch.testing.assert_close(D_min, schur_ldl_diagonal(Hd, Q_min), rtol=1e-9, atol=0)
    assert D_min.sum() <= D_act.sum() * (1 + 1e-12)
    # the product of D is det(H) in every order: against LU's log-determinant
    sign, logdet = torch.linalg.slogdet(Hd)
    assert sign == 1
    torch.testing.assert_close(D_min.log().sum(), logdet, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D_act.log().sum(), logdet, rtol=1e-9, atol=1e-9)


def test_act_order_is_descending_diagonal():
    H = correlated_hessian(20, seed=1)
    P = lq.act_order(H)
    diag = torch.diagonal(H)[P]
    assert (diag[:-1] >= diag[1:]).all()


def test_conventions_of_named_orders():
    H = correlated_hessian(10, seed=2)
    assert resolve_order("natural", H, "gptq").tolist() == list(range(10))
    assert resolve_order("natural", H, "babai").tolist() == list(range(10))
    assert resolve_order("reverse", H, "gptq").tolist() == list(range(9, -1, -1))
    for name in ("act", "min-pivot"):
        assert torch.equal(resolve_order(name, H, "gptq"), resolve_order(name, H, "babai").flip(0))


def test_ldl_diagonal_in_gptq_terms():
    """D_jj = 1 / U_jj^2 for GPTQ's factor of H^-1 in processing order (docs/theory.md §5)."""
    H = correlated_hessian(12, seed=3)
    P = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    U = torch.linalg.cholesky(torch.linalg.inv(H[P][:, P])).mT
    D = lq.ldl_diagonal(H, P.flip(0))
    torch.testing.assert_close(D[P], 1 / torch.diagonal(U) ** 2, rtol=1e-9, atol=0)
    # the Schur loop in basis order P.flip(0): GPTQ's first column is eliminated last
    torch.testing.assert_close(D, schur_ldl_diagonal(H, P.flip(0)), rtol=1e-9, atol=0)
    # the first column GPTQ quantizes conditions on all others: 1 / [H^-1]_jj
    j = int(P[0])
    torch.testing.assert_close(D[j], 1 / torch.linalg.inv(H)[j, j], rtol=1e-9, atol=0)
