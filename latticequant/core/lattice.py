"""Lattice routines for the closest vector problem, independent of any weight format.

A lattice is given by a basis; a point of it is ``B z`` with integer ``z``. Working with an
upper-triangular ``R`` (from QR of ``B``, or a Cholesky factor of ``B^T B``) and real coordinates
``u`` of the target (``y = R u``), the distance of ``R z`` to the target is ``||R (z - u)||``.
"""

from __future__ import annotations

import math

import torch


def _check_upper(R: torch.Tensor) -> None:
    if R.dim() != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be square, got shape {tuple(R.shape)}")
    if not torch.equal(R, torch.triu(R)):
        raise ValueError("R must be upper triangular")
    if not (torch.diagonal(R) != 0).all():
        raise ValueError("R must have a non-zero diagonal (a full-rank basis)")


def _box(bound: torch.Tensor | float | None, like: torch.Tensor, default: float) -> torch.Tensor:
    if bound is None:
        return torch.full_like(like, default)
    return torch.as_tensor(bound, dtype=like.dtype, device=like.device).expand_as(like)


def nearest_plane(
    R: torch.Tensor,
    u: torch.Tensor,
    lo: torch.Tensor | float | None = None,
    hi: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Babai's nearest plane on the upper-triangular basis R (docs/theory.md §3), textbook form.

    For ``i = n-1 .. 0``: ``z_i = round(u_i - sum_{j>i} R_ij (z_j - u_j) / R_ii)``, clamped to
    ``[lo_i, hi_i]`` when a box is given. ``u`` may carry leading batch dimensions, each decoded
    on its own. Returns integer-valued coordinates in u's dtype.
    """
    _check_upper(R)
    if u.shape[-1] != R.shape[0]:
        raise ValueError(f"u has {u.shape[-1]} coordinates, the basis {R.shape[0]} vectors")
    R = R.to(u.dtype)
    z = torch.zeros_like(u)
    lo_t, hi_t = _box(lo, u, -math.inf), _box(hi, u, math.inf)
    for i in range(R.shape[0] - 1, -1, -1):
        shift = ((z[..., i + 1 :] - u[..., i + 1 :]) * R[i, i + 1 :]).sum(-1) / R[i, i]
        z[..., i] = torch.round(u[..., i] - shift).clamp(lo_t[..., i], hi_t[..., i])
    return z


def lll_reduce(B: torch.Tensor, delta: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """LLL reduction of the columns of B: ``(A, T)`` with ``A = B T`` and T unimodular.

    Textbook LLL (Lenstra, Lenstra, Lovasz) in float64 with size reduction and the Lovasz
    condition ``||b*_k||^2 >= (delta - mu_{k,k-1}^2) ||b*_{k-1}||^2``.
    """
    if not 0.25 < delta <= 1:
        raise ValueError(f"delta must lie in (1/4, 1], got {delta}")
    if B.dim() != 2 or B.shape[1] > B.shape[0]:
        raise ValueError("B must be a (m, n) basis with n <= m vectors as columns")
    A = B.to(torch.float64).clone()
    n = A.shape[1]
    T = torch.eye(n, dtype=torch.float64)

    def gram_schmidt() -> tuple[torch.Tensor, torch.Tensor]:
        Qr, Rr = torch.linalg.qr(A)
        mu = (Rr / torch.diagonal(Rr)[:, None]).T  # mu[k, j] = <b_k, b*_j> / ||b*_j||^2
        return mu, torch.diagonal(Rr) ** 2

    if int(torch.linalg.matrix_rank(A)) < n:
        raise ValueError("B is not of full column rank")
    mu, Bn = gram_schmidt()
    k = 1
    while k < n:
        for j in range(k - 1, -1, -1):
            r = torch.round(mu[k, j])
            if r != 0:
                A[:, k] -= r * A[:, j]
                T[:, k] -= r * T[:, j]
                mu, Bn = gram_schmidt()
        if Bn[k] >= (delta - mu[k, k - 1] ** 2) * Bn[k - 1]:
            k += 1
        else:
            A[:, [k - 1, k]] = A[:, [k, k - 1]]
            T[:, [k - 1, k]] = T[:, [k, k - 1]]
            mu, Bn = gram_schmidt()
            k = max(k - 1, 1)
    return A.to(B.dtype), T.round().to(torch.long)


def babai_cvp(
    B: torch.Tensor, y: torch.Tensor, lll: bool = False, delta: float = 0.75
) -> torch.Tensor:
    """Integer coefficients z with ``B z`` close to y, on a general basis (columns of B).

    ``B = QR`` turns the problem into one on the triangular ``R`` with coordinates
    ``u = R^-1 Q^T y``. With ``lll=True`` the basis is first LLL-reduced, ``A = B T``, decoded
    on A, and mapped back by ``z = T z'`` (docs/theory.md §3, Eq. (9)). Unconstrained: a box does
    not survive T.
    """
    if B.dim() != 2 or y.dim() != 1 or y.shape[0] != B.shape[0]:
        raise ValueError("B must be (m, n) and y of length m")
    B64, y64 = B.to(torch.float64), y.to(torch.float64)
    T = None
    if lll:
        B64, T = lll_reduce(B64, delta)
    Qm, R = torch.linalg.qr(B64)
    u = torch.linalg.solve_triangular(R, (Qm.T @ y64)[:, None], upper=True)[:, 0]
    z = nearest_plane(R, u).round().to(torch.long)
    return T @ z if T is not None else z


def cvp_enumerate(
    R: torch.Tensor,
    u: torch.Tensor,
    lo: torch.Tensor | float | None = None,
    hi: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The exact closest point: Schnorr-Euchner enumeration, optionally inside a box.

    Depth-first from the last coordinate, trying values in order of distance from each level's
    centre and pruning by the best distance so far (started at Babai's). Exponential in the
    worst case: meant for small dimensions and as the reference a decoder is checked against.
    """
    _check_upper(R)
    if u.dim() != 1 or u.shape[0] != R.shape[0]:
        raise ValueError("u must be one vector of R's dimension")
    R = R.to(torch.float64).tolist()
    uu = u.to(torch.float64).tolist()
    n = len(uu)
    lo_l = _box(lo, u.to(torch.float64), -math.inf).tolist()
    hi_l = _box(hi, u.to(torch.float64), math.inf).tolist()
    z0 = nearest_plane(torch.tensor(R), u.to(torch.float64), lo, hi)
    best_z = z0.tolist()

    def dist(z: list[float]) -> float:
        return sum(sum(R[i][j] * (z[j] - uu[j]) for j in range(i, n)) ** 2 for i in range(n))

    best = [dist(best_z) * (1 + 1e-12) + 1e-300]
    z = [0.0] * n

    def search(i: int, partial: float) -> None:
        if i < 0:
            if partial < best[0]:
                best[0] = partial
                best_z[:] = z
            return
        c = uu[i] - sum(R[i][j] * (z[j] - uu[j]) for j in range(i + 1, n)) / R[i][i]
        r2 = R[i][i] ** 2
        lo_i, hi_i = lo_l[i], hi_l[i]
        x0 = min(max(round(c), lo_i), hi_i)
        # values in order of distance from c: x0, then alternating outwards
        up, down = x0 + 1, x0 - 1
        cand = x0
        while True:
            cost = partial + r2 * (cand - c) ** 2
            if cost < best[0]:
                z[i] = cand
                search(i - 1, cost)
            # pick the next candidate (the nearer of up and down that lies in the box)
            du = (up - c) ** 2 if up <= hi_i else math.inf
            dd = (down - c) ** 2 if down >= lo_i else math.inf
            if min(du, dd) == math.inf or partial + r2 * min(du, dd) >= best[0]:
                return
            if du <= dd:
                cand, up = up, up + 1
            else:
                cand, down = down, down - 1

    search(n - 1, 0.0)
    return torch.tensor(best_z, dtype=u.dtype)


def error_bound(D: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Babai's worst-case error ``1/4 * sum_j D_jj s_{g(j)}^2`` (docs/theory.md §5) per row of
    the group scales ``scales`` (rows, groups), column ``j`` in group ``g_idx[j]``.

    Summed as ``1/4 * sum_g s_g^2 * sum_{j in g} D_jj``, so no per-weight matrix of scales
    is formed (at 4096 x 14336 one is 470 MB in float64).
    """
    D64 = D.to(torch.float64)
    per_group = torch.zeros(scales.shape[1], dtype=torch.float64, device=D.device)
    per_group.index_add_(0, g_idx.to(D.device), D64)
    s64 = scales.to(torch.float64)
    return (0.25 * (s64 * s64)) @ per_group
