"""Quantization as CVP, decoded by Babai's nearest plane (docs/theory.md §2-3).

For one row the lattice basis is ``B = X diag(s)``; any factor of H gives the same problem, so
take ``R = U diag(s)`` with ``U^T U = H_Q`` upper triangular in the basis order ``Q``. With
``u = w / s + o`` nearest plane decodes, for ``i = d-1 .. 0``,

    z_i = round(u_i - sum_{j>i} R_ij (z_j - u_j) / R_ii).

Because ``s_j (z_j - u_j) = q_j - w_j``, this is rounding the projected target

    w~_i = w_i + sum_{j>i} (U_ij / U_ii) (w_j - q_j)

on row i's grid; ``U`` is shared by all rows, so every row is decoded at once. This module does
not use GPTQ's inverse-Hessian update: it is the second, independent derivation.
"""

from __future__ import annotations

import time

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
from latticequant.core.triangular import cholesky_lower_, permuted


def babai_factor(
    H: torch.Tensor, cfg: QuantConfig, diagonal: torch.Tensor | None = None, team=None
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Basis order ``Q`` and upper factor ``U`` of ``H_Q`` in float64, damping raised as needed.

    H is read, never written nor copied whole; ``diagonal`` as in
    :func:`~latticequant.core.gptq.gptq_factor`.
    """
    h = torch.diagonal(H).to(torch.float64) if diagonal is None else diagonal

    def factor(hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        Q = resolve_order_or_none(cfg.order, H, "babai", hd)
        if Q is None:
            return None
        L = permuted(H, Q, diagonal=hd, dtype=torch.float64)
        return (Q, L.mT) if cholesky_lower_(L, team) else None  # U = L^T, the upper factor of H_Q

    return with_damped_diagonal(h, cfg.damp, factor)


def babai_basis(
    H: torch.Tensor,
    cfg: QuantConfig,
    diagonal: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    team=None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    """What the nearest-plane decoders read of H: the basis order ``Q``, ``Un[k, j] =
    U_kj / U_kk`` in ``dtype`` and U's float64 diagonal ``u`` (``D = u^2``), with the damping
    used. Computed once per H and config; the decoders only read it."""
    (Q, U64), damp = babai_factor(H, cfg, diagonal, team)
    U = U64.to(dtype)
    u = torch.diagonal(U64).clone()
    Un = U.div_(torch.diagonal(U).clone()[:, None])  # in U's memory
    return (Q, Un, u), damp


def babai_quantize(
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
    """Quantize W (d_out, d_in) by nearest plane on the lattice of H, every row at once.

    ``cfg.order`` is the basis order ``Q``; decoding runs from ``Q[-1]`` to ``Q[0]``. The decode
    is blocked: targets of a block of ``block_size`` basis vectors receive the contribution of
    all vectors decoded before the block in one product, and each other within the block.
    With ``static_groups=False`` a group's grid is fitted on its error-updated weights when the
    decode reaches it, groups following decode positions as GPTQ's do. ``factor``:
    :func:`babai_basis`'s result for this H and config (W's dtype), computed once for several
    row blocks. ``levels``: a codebook the pinned grid's codes index, ``q = s (levels[z] - o)``
    (GGUF's IQ4_NL), each target rounded to its nearest level.
    """
    t0 = time.perf_counter()
    if isinstance(cfg.order, torch.Tensor):
        check_permutation(cfg.order, H.shape[0] if H.dim() == 2 else -1)
    W0 = W
    W, h = prepare_diagonal(W, H)
    d_out, d = W.shape
    (Q, Un, u), damp = factor if factor is not None else babai_basis(H, cfg, h, W.dtype)
    maxq, g = cfg.maxq, cfg.group_size
    refit = g != -1 and not cfg.static_groups and scales is None
    check_codebook(levels, scales)

    if refit:
        g_idx, S, Z = _decode_groups(W, Q, g)
    else:
        g_idx = group_index(d, g).to(W.device)
        S, Z = static_grid(W, cfg, scales, zeros, min_zero, integer_zeros, h)

    # basis vectors become rows: every per-vector read and write below is contiguous
    if not refit:  # one grid row per group, looked up per basis vector (no W-sized expansion)
        S_g, Z_g, g_of = S.T.contiguous(), Z.T.contiguous(), g_idx[Q].tolist()
    x = W[:, Q].T.contiguous()
    E = torch.zeros_like(x)  # residuals w_j - q_j of decoded vectors
    codes_t = torch.empty_like(x)
    targets_t = torch.empty_like(x)
    clipped = 0
    s = z = None
    for b in range(d, 0, -cfg.block_size):
        a = max(0, b - cfg.block_size)
        # projections of the block's targets against every vector decoded before the block
        T = x[a:b] + Un[a:b, b:] @ E[b:] if b < d else x[a:b]
        for i in range(b - 1, a - 1, -1):
            if refit:
                if (d - 1 - i) % g == 0:
                    s, z = _refit(x, E, Un, T, a, b, i, max(0, i - g + 1), cfg, min_zero)
                    S[:, (d - 1 - i) // g], Z[:, (d - 1 - i) // g] = s, z
            else:
                s, z = S_g[g_of[i]], Z_g[g_of[i]]
            t = T[i - a] + Un[i, i + 1 : b] @ E[i + 1 : b] if i + 1 < b else T[i - a]
            targets_t[i] = t
            code, level, n_clipped = snap(t / s + z, maxq, cfg.clip, levels)
            clipped += n_clipped
            codes_t[i] = code
            E[i] = x[i] - s * (level - z)

    codes_q, targets_q = codes_t.T, targets_t.T
    codes = torch.empty_like(codes_q)
    codes[:, Q] = codes_q
    targets = torch.empty_like(targets_q)
    targets[:, Q] = targets_q
    D = torch.empty(d, dtype=torch.float64, device=W.device)
    D[Q] = u**2
    return assemble(
        W=W0, H=H, codes=codes, scales=S, zeros=Z, g_idx=g_idx, order=Q, D=D,
        clipped=clipped, bits=cfg.bits, clip=cfg.clip, damp=damp, targets=targets, t0=t0,
        projected=(W, damp * float(h.mean())), levels=levels,
    )  # fmt: skip


def _decode_groups(W: torch.Tensor, Q: torch.Tensor, g: int):
    """Groups along the decode, with empty grids the decode fills: decode position
    ``t = d-1-i`` of basis index ``i``; groups are runs of ``g`` positions."""
    d_out, d = W.shape
    g_idx = torch.empty(d, dtype=torch.long, device=W.device)
    g_idx[Q] = (d - 1 - torch.arange(d, device=W.device)) // g
    S = torch.empty(d_out, n_groups(d, g), dtype=W.dtype, device=W.device)
    return g_idx, S, torch.empty_like(S)


def _refit(
    x: torch.Tensor,
    E: torch.Tensor,
    Un: torch.Tensor,
    T: torch.Tensor,
    a: int,
    b: int,
    i: int,
    lo: int,
    cfg: QuantConfig,
    min_zero: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of the group of basis indices ``[lo, i]``, fitted on its error-updated weights.

    Those are the real-valued continuation that is optimal given every vector decoded so far
    (indices above ``i``): back-substitution through the group's own triangle,
    ``w_G + Un_GG^-1 Un_{G,>i} e_{>i}``, which is GPTQ's OBS-updated weight. For the part of
    the group inside the current block ``[a, b)``, T already holds the vectors decoded before it.
    """
    start = max(lo, a)
    parts = []
    if lo < a:
        parts.append(Un[lo:a, i + 1 :] @ E[i + 1 :])
    inside = T[start - a : i - a + 1] - x[start : i + 1]
    if i + 1 < b:
        inside = inside + Un[start : i + 1, i + 1 : b] @ E[i + 1 : b]
    parts.append(inside)
    V = torch.cat(parts) if len(parts) > 1 else parts[0]
    Y = torch.linalg.solve_triangular(Un[lo : i + 1, lo : i + 1], V, upper=True)
    return fit_rows((x[lo : i + 1] + Y).T, cfg, min_zero)
