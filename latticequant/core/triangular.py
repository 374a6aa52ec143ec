"""Triangular factors of a wide Hessian inside one buffer.

GPTQ's factor ``U = J L^-1 J`` (docs/theory.md §4) is three steps on an ``n x n`` matrix:
a Cholesky factorization, a triangular inverse and a reversal of both axes. Done with
torch's out-of-place calls each step holds its input and its output at once; at the width of
Llama-3-8B's ``down_proj`` (n = 14336, 1.6 GB per float64 copy) those copies, not the
arithmetic, set the peak memory of the whole run. Here each step overwrites its input.
"""

from __future__ import annotations

import torch

__all__ = [
    "all_finite",
    "cholesky_lower_",
    "factor_tile",
    "invert_lower_",
    "permuted",
    "reverse_",
]

#: Rows per block of the blocked triangular inverse: large enough for matrix products to
#: run at full speed, small enough that the block's temporaries stay a few MB.
INVERSE_BLOCK = 256
#: Elements moved per step of the in-place reversal.
REVERSE_CHUNK = 1 << 20
#: Rows per step of a permuted gather: 256 rows of a 14336-wide float32 H are 15 MB.
PERMUTE_ROWS = 256


def permuted(
    H: torch.Tensor,
    order: torch.Tensor,
    *,
    diagonal: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``H[order][:, order]`` as one new matrix (the two-step indexing makes two).

    ``dtype``: the new matrix's dtype (H's by default); the gather runs by blocks of rows, so a
    float32 H becomes a float64 factor buffer without a float32 copy beside it. ``diagonal``:
    the diagonal to put in its place, in H's column order (dead columns and damping, without
    writing into H or copying it whole).
    """
    out = torch.empty(H.shape, dtype=dtype or H.dtype, device=H.device)
    for a in range(0, H.shape[0], PERMUTE_ROWS):
        rows = order[a : a + PERMUTE_ROWS]
        out[a : a + PERMUTE_ROWS] = H[rows.unsqueeze(1), order]
    if diagonal is not None:
        torch.diagonal(out).copy_(diagonal[order])
    return out


def factor_tile(n: int) -> int:
    """Columns per panel of the tiled Cholesky factorization of an ``n x n`` matrix: about
    32 panels, a multiple of 32 between 32 and 512; decided from ``n`` alone, so one process
    runs the very products a team of ranks shares out."""
    per_panel = -(-n // 32)  # n / 32, rounded up
    return min(512, max(32, -(-per_panel // 32) * 32))


def _team(team) -> tuple[int, int]:
    return (team.rank, team.size) if team is not None and team.size > 1 else (0, 1)


def cholesky_lower_(A: torch.Tensor, team=None) -> bool:
    """Overwrite the symmetric ``A`` with its lower Cholesky factor ``L`` (``L L^T = A``,
    zeros above the diagonal); False when A is not (numerically) positive definite, in which
    case A's contents are undefined.

    Right-looking by panels of :func:`factor_tile` columns: the panel's diagonal tile is
    factored (LAPACK), the rows below it solved against that tile, and each later panel of
    columns updated by it (``A_jj.. -= L_.k L_jk^T``), panel after panel in the same order.
    ``team`` (``rank``, ``size``, ``broadcast(obj, kind, src)``, as
    :class:`~latticequant.pipeline.distributed.World` has) shares the work out: panel ``k``
    belongs to rank ``k mod size``, which factors it and sends it to every rank; each rank
    updates the panels it owns. Every product has the same operands and shape on any number
    of ranks, so every rank ends with one process's factor, bit for bit.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1] or not A.is_contiguous():
        raise ValueError(f"cholesky_lower_ needs a contiguous square matrix, got {tuple(A.shape)}")
    n = A.shape[0]
    rank, size = _team(team)
    tile = factor_tile(n)
    starts = list(range(0, n, tile))
    for k, a in enumerate(starts):
        b = min(a + tile, n)
        owner = k % size
        panel = None
        if owner == rank:
            L, info = torch.linalg.cholesky_ex(A[a:b, a:b])
            if int(info) == 0:
                A[a:b, a:b] = L
                if b < n:  # L_ik = A_ik L_kk^-T
                    A[b:, a:b] = torch.linalg.solve_triangular(
                        L.mT, A[b:, a:b], upper=True, left=False
                    )
                panel = A[a:, a:b]
        if size > 1:
            sent = team.broadcast(None if panel is None else panel.cpu(), "factor", src=owner)
            if sent is None:
                return False
            if owner != rank:
                A[a:, a:b] = sent.to(A.device)
        elif panel is None:
            return False
        for j in range(k + 1, len(starts)):
            if j % size != rank:
                continue
            c, e = starts[j], min(starts[j] + tile, n)
            A[c:, c:e].addmm_(A[c:, a:b], A[c:e, a:b].T, alpha=-1)
    for a in starts:  # zeros above the diagonal, a band of rows at a time
        b = min(a + tile, n)
        A[a:b, b:] = 0
        A[a:b, a:b].tril_()
    return all_finite(A)


def invert_lower_(L: torch.Tensor, block: int = INVERSE_BLOCK, team=None) -> torch.Tensor:
    """Overwrite the lower triangular ``L`` (zeros above the diagonal) with ``L^-1``.

    Blocks of rows from the bottom up: with ``L = [[D, 0], [B, E]]`` and ``E^-1`` already in
    place, ``L^-1 = [[D^-1, 0], [-E^-1 B D^-1, E^-1]]``. Each step reads the finished
    ``E^-1`` and writes only the block column below ``D`` and ``D`` itself. The block column
    is made ``block`` rows at a time (``E^-1``'s rows against B, then solved against D): with
    a ``team`` each rank makes some of those tiles and every rank receives them all, the same
    products as one process's.
    """
    n = L.shape[0]
    rank, size = _team(team)
    for step, j in enumerate(range(((n - 1) // block) * block, -1, -block)):
        e = min(j + block, n)
        D = L[j:e, j:e]
        if e < n:
            tiles = list(range(e, n, block))
            mine = {}
            for m, r0 in enumerate(tiles):
                if (m + step) % size != rank:
                    continue
                r1 = min(r0 + block, n)
                # E^-1's rows r0..r1 against B; zeros of E^-1 above its diagonal are real
                panel = L[r0:r1, e:r1] @ L[e:r1, j:e]
                mine[r0] = torch.linalg.solve_triangular(D, panel, upper=False, left=False).neg_()
            if size > 1:
                for part in team.all_gather({r: t.cpu() for r, t in mine.items()}, "factor"):
                    mine.update(part)
            for r0, t in mine.items():
                L[r0 : r0 + t.shape[0], j:e] = t.to(L.device)
        eye = torch.eye(e - j, dtype=L.dtype, device=L.device)
        D.copy_(torch.linalg.solve_triangular(D, eye, upper=False).tril_())
    return L


def reverse_(M: torch.Tensor, chunk: int = REVERSE_CHUNK) -> torch.Tensor:
    """``M.flip(0, 1)`` in place: on contiguous storage it is the reversal of the flat array,
    done by swapping mirrored chunks."""
    if not M.is_contiguous():
        raise ValueError("reverse_ needs a contiguous tensor")
    flat = M.view(-1)
    N = flat.numel()
    for a in range(0, N // 2, chunk):
        b = min(a + chunk, N // 2)
        lo, hi = flat[a:b], flat[N - b : N - a]
        mirrored = lo.flip(0)
        lo.copy_(hi.flip(0))
        hi.copy_(mirrored)
    return M


def all_finite(M: torch.Tensor, rows: int = 1024) -> bool:
    """``torch.isfinite(M).all()`` without a mask the size of M."""
    return all(bool(torch.isfinite(M[i : i + rows]).all()) for i in range(0, M.shape[0], rows))
