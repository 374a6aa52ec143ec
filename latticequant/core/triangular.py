"""Triangular factors of a wide Hessian inside one buffer.

GPTQ's factor ``U = J L^-1 J`` (docs/theory.md §4) is three steps on an ``n x n`` matrix:
a Cholesky factorization, a triangular inverse and a reversal of both axes. Done with
torch's out-of-place calls each step holds its input and its output at once; at the width of
Llama-3-8B's ``down_proj`` (n = 14336, 1.6 GB per float64 copy) those copies, not the
arithmetic, set the peak memory of the whole run. Here each step overwrites its input.
"""

from __future__ import annotations

import torch

__all__ = ["all_finite", "cholesky_lower_", "invert_lower_", "permuted", "reverse_"]

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


def cholesky_lower_(A: torch.Tensor) -> bool:
    """Overwrite the symmetric ``A`` with its lower Cholesky factor ``L`` (``L L^T = A``,
    zeros above the diagonal); False when A is not (numerically) positive definite, in which
    case A's contents are undefined.

    LAPACK works on column-major storage: ``A.mT`` is that view of a row-major A, and its upper
    factor ``U = L^T`` written there is ``L`` read row by row, so no copy is made.
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1] or not A.is_contiguous():
        raise ValueError(f"cholesky_lower_ needs a contiguous square matrix, got {tuple(A.shape)}")
    At = A.mT
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(At, upper=True, out=(At, info))
    return int(info) == 0 and all_finite(A)


def invert_lower_(L: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """Overwrite the lower triangular ``L`` (zeros above the diagonal) with ``L^-1``.

    Blocks of rows from the bottom up: with ``L = [[D, 0], [B, E]]`` and ``E^-1`` already in
    place, ``L^-1 = [[D^-1, 0], [-E^-1 B D^-1, E^-1]]``. Each step reads the finished
    ``E^-1`` and writes only the block column below ``D`` and ``D`` itself.
    """
    n = L.shape[0]
    for j in range(((n - 1) // block) * block, -1, -block):
        e = min(j + block, n)
        D = L[j:e, j:e]
        if e < n:
            panel = L[e:, e:] @ L[e:, j:e]  # E^-1 B; E^-1's zeros above its diagonal are real
            L[e:, j:e] = torch.linalg.solve_triangular(D, panel, upper=False, left=False).neg_()
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
