"""Processing orders and the LDL diagonal ``D`` they induce (docs/theory.md §5-6).

Two conventions meet here. GPTQ's *processing order* ``P`` lists columns in the order they are
quantized. Babai's *basis order* ``Q`` lists basis vectors; nearest plane decodes the last one
first. They describe the same decode when ``Q = P.flip(0)``. ``D`` is always returned indexed by
column, so it does not depend on the convention.
"""

from __future__ import annotations

import torch

from latticequant.core.config import Order
from latticequant.core.triangular import cholesky_lower_, permuted

CONVENTIONS = ("gptq", "babai")


def act_order(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: process columns by descending ``diag(H)`` (a processing order)."""
    return _descending(torch.diagonal(H))


def _descending(h: torch.Tensor) -> torch.Tensor:
    return torch.argsort(h, descending=True, stable=True)


def min_pivot_order(
    H: torch.Tensor, block: int = 64, diagonal: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-pivot (the paper's Algorithm 3, docs/theory.md §6) as a basis order: the smallest
    Schur-complement pivot first.

    Greedy symmetric pivoting ``H <- H - H[:, j] H[j, :] / H_jj`` on the smallest current
    diagonal, done as a left-looking pivoted Cholesky: only the diagonal is updated at every
    step, the trailing matrix once per panel of ``block`` pivots (``O(d^3)`` work, mostly in
    matrix products). Returns ``(Q, pivots)`` with ``pivots[k]`` the k-th LDL diagonal entry.
    ``diagonal`` replaces H's own (see :func:`resolve_order`).
    """
    A = H.to(torch.float64, copy=True)
    if diagonal is not None:
        torch.diagonal(A).copy_(diagonal)
    d = A.shape[0]
    diag = torch.diagonal(A).clone()
    taken = torch.zeros(d, dtype=torch.bool, device=A.device)
    order = torch.empty(d, dtype=torch.long, device=A.device)
    pivots = torch.empty(d, dtype=torch.float64, device=A.device)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=A.device)
    for k0 in range(0, d, block):
        nb = min(block, d - k0)
        panel = torch.zeros(d, nb, dtype=torch.float64, device=A.device)
        for j in range(nb):
            p = int(torch.argmin(torch.where(taken, inf, diag)))
            col = A[:, p] - panel[:, :j] @ panel[p, :j]
            piv = col[p]
            if not piv > 0:
                raise ValueError("H is not positive definite: a Schur pivot is not positive")
            taken[p] = True
            order[k0 + j] = p
            pivots[k0 + j] = piv
            col = torch.where(taken, torch.zeros_like(col), col / piv.sqrt())
            panel[:, j] = col
            diag -= col * col
        A -= panel @ panel.T
    return order, pivots


def ldl_diagonal(
    H: torch.Tensor, basis_order: torch.Tensor, diagonal: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``D`` for Babai's basis order, indexed by column (None if H is not positive definite).

    ``D_ii = R_ii^2`` for the upper Cholesky factor of ``H[Q][:, Q]``: the squared Gram-Schmidt
    lengths of the basis in that order. ``diagonal`` replaces H's own (see
    :func:`resolve_order`); the factor is made in one float64 buffer.
    """
    L = permuted(H, basis_order, diagonal=diagonal, dtype=torch.float64)
    if not cholesky_lower_(L):
        return None
    D = torch.empty(H.shape[0], dtype=torch.float64, device=H.device)
    D[basis_order] = torch.diagonal(L) ** 2
    return D


def check_permutation(order: torch.Tensor, d_in: int) -> torch.Tensor:
    """Raise a ``ValueError`` unless ``order`` is a permutation of ``0 .. d_in-1``."""
    order = order.to(torch.long).flatten()
    if order.numel() != d_in:
        raise ValueError(f"order has {order.numel()} entries, expected d_in = {d_in}")
    seen = torch.zeros(d_in, dtype=torch.bool)
    ok = bool(((order >= 0) & (order < d_in)).all())
    if ok:
        seen[order.cpu()] = True
        ok = bool(seen.all())
    if not ok:
        raise ValueError(f"order is not a permutation of 0..{d_in - 1}")
    return order


def resolve_order(
    order: Order, H: torch.Tensor, convention: str, diagonal: torch.Tensor | None = None
) -> torch.Tensor:
    """The permutation for ``order`` in the given convention ("gptq" or "babai").

    ``"natural"`` is ``0..d-1`` and ``"reverse"`` its flip, literally, in either convention.
    ``"act"`` and ``"min-pivot"`` name heuristics: each convention gets the permutation that makes
    it decode in the heuristic's sequence, so GPTQ and Babai agree for these names.
    ``diagonal``: the diagonal the solve uses in place of H's own (dead columns, damping).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    d = H.shape[0]
    if isinstance(order, torch.Tensor):
        return check_permutation(order, d).to(H.device)
    if order == "natural":
        return torch.arange(d, device=H.device)
    if order == "reverse":
        return torch.arange(d - 1, -1, -1, device=H.device)
    if order == "act":
        P = act_order(H) if diagonal is None else _descending(diagonal)
        return P if convention == "gptq" else P.flip(0)
    if order == "min-pivot":
        Q, _ = min_pivot_order(H, diagonal=diagonal)
        return Q.flip(0) if convention == "gptq" else Q
    raise ValueError(f"unknown order {order!r}")


def resolve_order_or_none(
    order: Order, H: torch.Tensor, convention: str, diagonal: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``resolve_order`` inside ``with_damped_diagonal``: None asks for more damping.

    Min-pivot meets a non-positive pivot when H is not positive definite; an explicit order that
    is not a permutation is the caller's error and still raises.
    """
    try:
        return resolve_order(order, H, convention, diagonal)
    except ValueError:
        if isinstance(order, torch.Tensor):
            raise
        return None
