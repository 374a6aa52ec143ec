"""GPTQ in its blocked lazy-batch form, for any processing order (docs/theory.md §4).

Column ``P[p]`` is quantized at step ``p``; the error is spread over the columns not yet
quantized by the OBS update ``dw_F = -e_j [H_F^-1]_{F,j} / [H_F^-1]_{jj}``. With the upper
Cholesky factor ``U`` of ``H_P^-1`` (``H_P^-1 = U^T U``) the update for step p is the row
``U[p, p:]`` scaled by ``(w - q) / U_pp``. Blocks of ``block_size`` columns apply the update
inside the block at once per column and to the rest of the matrix once per block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from latticequant.core.config import QuantConfig
from latticequant.core.grid import (
    check_codebook,
    fit_rows,
    group_index,
    n_groups,
    snap,
    static_grid,
)
from latticequant.core.hessian import prepare_diagonal, with_damped_diagonal
from latticequant.core.order import check_permutation, resolve_order_or_none
from latticequant.core.result import QuantResult, assemble
from latticequant.core.triangular import (
    all_finite,
    cholesky_lower_,
    invert_lower_,
    permuted,
    reverse_,
)


def gptq_factor(
    H: torch.Tensor, cfg: QuantConfig, diagonal: torch.Tensor | None = None, team=None
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Processing order ``P`` and upper factor ``U`` of ``H_P^-1`` in float64, damping raised
    as needed.

    H is read, never written nor copied whole: U is gathered from it into one new ``n x n``
    float64 matrix and factored there. ``diagonal`` is the float64 diagonal the solve uses
    (:func:`~latticequant.core.hessian.prepare_diagonal`'s, dead columns set to 1); H's own by
    default. ``team``: ranks that share the factorization and the inverse out
    (:func:`~latticequant.core.triangular.cholesky_lower_`); each gets the whole factor.
    """
    h = torch.diagonal(H).to(torch.float64) if diagonal is None else diagonal

    def factor(hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        P = resolve_order_or_none(cfg.order, H, "gptq", hd)
        if P is None:
            return None
        # U^T U = H_P^-1 without forming the inverse: with J the reversal and J H_P J = L L^T,
        # H_P = (J L J)(J L J)^T, so U = (J L J)^-1 = J L^-1 J.
        U = permuted(H, P.flip(0), diagonal=hd, dtype=torch.float64)  # J H_P J
        if not cholesky_lower_(U, team):
            return None
        reverse_(invert_lower_(U, team=team))
        return (P, U) if all_finite(U) else None

    return with_damped_diagonal(h, cfg.damp, factor)


#: Columns of W per step of the gather into processing order.
GATHER_COLUMNS = 1024


@dataclass
class Decoded:
    """Codes of a GPTQ decode in the original column order, and the grid it used."""

    codes: torch.Tensor
    targets: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    clipped: int
    outliers: torch.Tensor | None


def gptq_decode(
    W: torch.Tensor,
    P: torch.Tensor,
    U: torch.Tensor,
    cfg: QuantConfig,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    outlier_dtype: torch.dtype | None = None,
    min_zero: int = 0,
    levels: torch.Tensor | None = None,
) -> Decoded:
    """The blocked GPTQ loop on a prepared problem: W, processing order P, ``U^T U = H_P^-1``.

    ``scales``/``zeros`` give the static grid; None with ``static_groups=False`` refits each
    group when the loop reaches it. With ``outlier_dtype`` a weight whose code would leave the
    grid is kept as its error-updated value in that dtype (SSQR's outliers, docs/theory.md §7):
    its code becomes the zero point and the error it passes on is that dtype's rounding error.
    ``min_zero``: the smallest offset a refitted grid may take (a property of the storage).
    ``levels``: a codebook (sorted, in units of the scale) the static grid's codes index:
    ``q = s (levels[z] - o)``, each weight rounded to the nearest level (GGUF's IQ4_NL).
    """
    check_codebook(levels, scales)
    if levels is not None and outlier_dtype is not None:
        raise ValueError("a codebook grid keeps every weight on its levels: no outliers")
    d_out, d_in = W.shape
    maxq, g = cfg.maxq, cfg.group_size
    refit = scales is None
    g_idx, S, Z = _decode_grid(W, P, cfg, scales, zeros)
    if not refit:  # one grid row per group, looked up per column: a (d_in, d_out) expansion
        # of the scales and zeros would be two more W-sized float64 matrices
        S_g, Z_g, g_of = S.T.contiguous(), Z.T.contiguous(), g_idx[P].tolist()
    U = U.to(W.dtype)
    Wt = columns_in_order(W, P)
    col = P.tolist()
    # clipped codes (and SSQR's, whose outliers take the zero point) lie in [0, maxq]: int16
    # holds them in a quarter of a float64 matrix; unclipped codes keep W's dtype
    bounded = cfg.clip or outlier_dtype is not None
    codes_t = torch.empty_like(Wt, dtype=torch.int16 if bounded else Wt.dtype)
    targets_t = torch.empty_like(Wt)
    out_t = torch.zeros_like(Wt, dtype=torch.bool) if outlier_dtype is not None else None
    clipped = 0
    s = z = None
    for i1 in range(0, d_in, cfg.block_size):
        i2 = min(i1 + cfg.block_size, d_in)
        U1t = U[i1:i2, i1:i2].T.contiguous()
        ErrT = torch.empty(i2 - i1, d_out, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            p = i1 + i
            if refit:
                if p % g == 0:
                    s, z = _refit(Wt, ErrT, U, i1, i, min(p + g, d_in), cfg, min_zero)
                    S[:, p // g], Z[:, p // g] = s, z
            else:
                s, z = S_g[g_of[p]], Z_g[g_of[p]]
            # the lazy batch: this column receives the updates of the block's earlier columns
            w = Wt[p] - U1t[i, :i] @ ErrT[:i] if i else Wt[p]
            targets_t[col[p]] = w
            if out_t is not None:
                code = torch.round(w / s + z)
                out = (code < 0) | (code > maxq)
                out_t[col[p]] = out
                code = torch.where(out, z, code)
                q = torch.where(out, w.to(outlier_dtype).to(w.dtype), s * (code - z))
            else:
                code, level, n_clipped = snap(w / s + z, maxq, cfg.clip, levels)
                clipped += n_clipped
                q = s * (level - z)
            codes_t[col[p]] = code
            ErrT[i] = (w - q) / U1t[i, i]
        if i2 < d_in:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, ErrT, alpha=-1)  # in place: no W-sized product

    del Wt
    outliers = None if out_t is None else out_t.T
    return Decoded(codes_t.T, targets_t.T, S, Z, g_idx, clipped, outliers)


def _decode_grid(W, P, cfg: QuantConfig, scales, zeros):
    """``(g_idx, S, Z)`` of a decode: the static grid given, or empty grids that the loop fills
    as it reaches each group (groups then follow processing positions)."""
    d_out, d_in = W.shape
    g = cfg.group_size
    if scales is not None:
        return group_index(d_in, g).to(W.device), scales, zeros
    if g == -1 or cfg.static_groups:
        raise ValueError("gptq_decode needs a static grid unless groups are refitted")
    g_idx = torch.empty(d_in, dtype=torch.long, device=W.device)
    g_idx[P] = torch.arange(d_in, device=W.device) // g
    S = torch.empty(d_out, n_groups(d_in, g), dtype=W.dtype, device=W.device)
    return g_idx, S, torch.empty_like(S)


def columns_in_order(W: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``W[:, P]^T``: columns become rows, so every per-column read and write of a decode is
    contiguous; gathered by blocks, with no W-sized temporary beside it."""
    d_out, d_in = W.shape
    Wt = torch.empty(d_in, d_out, dtype=W.dtype, device=W.device)
    for a in range(0, d_in, GATHER_COLUMNS):
        Wt[a : a + GATHER_COLUMNS] = W[:, P[a : a + GATHER_COLUMNS]].T
    return Wt


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    *,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    min_zero: int = 0,
    factor: tuple | None = None,
    integer_zeros: bool = True,
    levels: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize W (d_out, d_in) against the Hessian H (d_in, d_in) with GPTQ.

    ``cfg.order`` is the processing order. ``scales``/``zeros`` (d_out, n_groups) pin a static
    grid instead of fitting one. With ``static_groups=False`` and groups, each group's grid is
    fitted when the loop reaches its first column, on the weights updated by every column
    quantized before it (groups then follow processing positions, ``g_idx[P[p]] = p // g``).
    ``factor``: :func:`gptq_factor`'s ``((P, U), damp)`` for this H and config, computed once
    when several row blocks of one layer (or layers of one H) are solved; read, never written.
    ``levels``: a codebook the pinned grid's codes index (:func:`gptq_decode`).
    """
    t0 = time.perf_counter()
    if isinstance(cfg.order, torch.Tensor):
        check_permutation(cfg.order, H.shape[0] if H.dim() == 2 else -1)
    W0 = W
    W, h = prepare_diagonal(W, H)
    # the only float64 n x n matrix of the solve
    (P, U), damp = factor if factor is not None else gptq_factor(H, cfg, h)
    lam = damp * float(h.mean())
    D = torch.empty(W.shape[1], dtype=torch.float64, device=W.device)
    D[P] = 1.0 / torch.diagonal(U) ** 2
    U = U.to(W.dtype)
    if cfg.group_size != -1 and not cfg.static_groups and scales is None:
        S = Z = None
    else:
        S, Z = static_grid(W, cfg, scales, zeros, min_zero, integer_zeros, h)
    dec = gptq_decode(W, P, U, cfg, S, Z, min_zero=min_zero, levels=levels)
    del U
    return assemble(
        W=W0, H=H, codes=dec.codes, scales=dec.scales, zeros=dec.zeros, g_idx=dec.g_idx,
        order=P, D=D, clipped=dec.clipped, bits=cfg.bits, clip=cfg.clip, damp=damp,
        targets=dec.targets, t0=t0, projected=(W, lam), levels=levels,
    )  # fmt: skip


def _refit(
    Wt: torch.Tensor,
    ErrT: torch.Tensor,
    U: torch.Tensor,
    i1: int,
    i: int,
    end: int,
    cfg: QuantConfig,
    min_zero: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of the group at positions ``[p, end)``, ``p = i1 + i``, on its updated weights.

    The rows of ``Wt`` carry the updates of every block before this one; the block's own
    columns before ``p`` are applied here, so the group sees every column quantized before it.
    """
    p = i1 + i
    cols = Wt[p:end]
    if i:
        cols = cols - U[i1:p, p:end].T @ ErrT[:i]
    return fit_rows(cols.T, cfg, min_zero)
