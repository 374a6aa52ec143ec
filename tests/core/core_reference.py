"""Independent float64 references for what every QuantResult reports: loss, D and bound.

Nothing here calls the package's Hessian, grid, LDL or bound code. The LDL diagonal comes from
the literal Schur-complement loop, the dequantized weights from the grid formula, the loss from
the quadratic form on the Hessian as given, and the bound from its definition
``1/4 * sum_j D_jj s_j^2`` (docs/theory.md §5).

Conventions (latticequant/core/order.py): GPTQ's processing order ``P`` is the sequence in which
columns are quantized; Babai's basis order ``Q = P.flip(0)`` is decoded last-to-first. ``D`` of
basis vector ``Q[k]`` is its squared Gram-Schmidt length against ``Q[0..k-1]``, i.e. the k-th
pivot when the Schur complement eliminates columns in basis order: the first column GPTQ
quantizes is eliminated last and gets the pivot conditioned on every other column.
"""

from __future__ import annotations

import torch


def prepared_hessian(H: torch.Tensor) -> torch.Tensor:
    """H in float64 with every dead column (``H_jj == 0``) given ``H_jj = 1`` (as the reference
    GPTQ does, so the basis stays full rank)."""
    H = H.to(torch.float64).clone()
    for j in range(H.shape[0]):
        if H[j, j] == 0:
            H[j, j] = 1.0
    return H


def damped_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H' + damp * mean(diag H') * I`` with ``H'`` the prepared Hessian."""
    Hp = prepared_hessian(H)
    d = Hp.shape[0]
    lam = damp * sum(float(Hp[j, j]) for j in range(d)) / d
    return Hp + lam * torch.eye(d, dtype=torch.float64)


def schur_ldl_diagonal(Hd: torch.Tensor, basis_order: torch.Tensor) -> torch.Tensor:
    """The LDL diagonal of ``Hd`` for Babai's basis order, indexed by column: eliminate the
    columns one by one in basis order, the pivot of each is its ``D``. No library LDL/Cholesky."""
    A = Hd.to(torch.float64).clone()
    D = [float("nan")] * A.shape[0]
    for k in basis_order.tolist():
        piv = float(A[k, k])
        assert piv > 0, "the damped Hessian is not positive definite"
        D[k] = piv
        A -= torch.outer(A[:, k], A[k, :] / piv)  # the Schur complement of pivot k
    return torch.tensor(D, dtype=torch.float64)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, msg):
    """``|actual - expected| <= atol + rtol |expected|`` elementwise (a cheap assert_close)."""
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert actual.shape == expected.shape, msg
    err = (actual - expected).abs()
    ok = err <= atol + rtol * expected.abs()
    assert bool(ok.all()), f"{msg}: max error {float(err.max()):.3g} ({int((~ok).sum())} off)"


def dequantized(r) -> torch.Tensor:
    """``q = scales[:, g_idx] * (codes - zeros[:, g_idx])`` in float64, from the result's codes."""
    s = r.scales.to(torch.float64)[:, r.g_idx]
    z = r.zeros.to(torch.float64)[:, r.g_idx]
    return s * (r.codes.to(torch.float64) - z)


def direct_loss(W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Per row ``(w - q)^T H (w - q)`` on the undamped H as given, in float64."""
    E = W.to(torch.float64) - Q.to(torch.float64)
    return torch.einsum("ri,ij,rj->r", E, H.to(torch.float64), E)


def bound_from(D: torch.Tensor, r) -> torch.Tensor:
    """Per row ``1/4 * sum_j D_jj s_j^2`` with ``s_j = scales[row, g_idx[j]]``, in float64."""
    s = r.scales.to(torch.float64)[:, r.g_idx]
    return 0.25 * (D[None, :] * s * s).sum(dim=1)


def check_result(
    W: torch.Tensor,
    H: torch.Tensor,
    r,
    basis_order: torch.Tensor,
    *,
    decoded: bool = True,
    D: torch.Tensor | None = None,
    where: str = "",
) -> torch.Tensor:
    """Check a result's loss, D and bound against the references above; returns D.

    ``basis_order`` is Babai's basis order of the decode (``P.flip(0)`` for GPTQ's processing
    order P). With ``decoded`` (GPTQ, Babai: every code rounded from its projected target) the
    bound must also hold: on every row when ``r.clipped == 0``; otherwise clipping is shown to
    have happened (codes clamped to the grid's ends, as many as reported) and the bound is
    checked on the rows where no code was clamped (rows are decoded independently).
    ``D`` may pass a reference diagonal already computed for the same damped H and order.
    """
    f64 = W.dtype == torch.float64 and H.dtype == torch.float64
    tol = 1e-9 if f64 else 1e-5
    if D is None:
        D = schur_ldl_diagonal(damped_hessian(H, r.damp), basis_order)
    Q = dequantized(r)
    loss = direct_loss(W, H, Q)
    bound = bound_from(D, r)
    q_tol = 0.0 if f64 else 1e-6
    _assert_close(r.Q, Q, q_tol, q_tol * float(Q.abs().max()), f"Q, {where}")
    loss_tol = 1e-9 if f64 else 1e-4
    _assert_close(r.loss, loss, loss_tol, loss_tol * float(loss.max()), f"loss, {where}")
    _assert_close(r.D, D, tol, 0.0, f"D, {where}")
    _assert_close(r.bound, bound, tol, 0.0, f"bound, {where}")
    maxq = (1 << r.bits) - 1
    assert r.overflow == int(((r.codes < 0) | (r.codes > maxq)).sum()), where
    if not decoded:
        return D
    if r.clipped == 0:
        assert (loss <= bound * (1 + 1e-9)).all(), where
        return D
    # clipping happened: recompute the raw codes from the targets they were rounded from
    s = r.scales[:, r.g_idx]
    z = r.zeros[:, r.g_idx]
    raw = torch.round(r.targets / s + z)
    out = (raw < 0) | (raw > maxq)
    assert int(out.sum()) == r.clipped, where
    assert torch.equal(r.codes.double(), raw.clamp(0, maxq).double()), where
    edge = (r.codes == 0) | (r.codes == maxq)
    assert edge[out].all() and edge.any(), where
    # a row with no code at either end of the grid cannot have been clamped
    assert not (out.any(dim=1) & ~edge.any(dim=1)).any(), where
    rows = ~out.any(dim=1)
    assert (loss[rows] <= bound[rows] * (1 + 1e-9)).all(), where
    return D
