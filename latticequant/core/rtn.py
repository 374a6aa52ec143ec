"""Round-to-nearest on the same grids: the baseline every decoder is measured against."""

from __future__ import annotations

import time

import torch

from latticequant.core.config import QuantConfig
from latticequant.core.grid import (
    check_codebook,
    dequantize,
    group_index,
    nearest_level,
    outside_levels,
    round_to_grid,
    static_grid,
)
from latticequant.core.hessian import (
    check_inputs,
    prepare_diagonal,
    solve_diagonal,
    with_damped_diagonal,
)
from latticequant.core.order import ldl_diagonal, resolve_order_or_none
from latticequant.core.result import LOSS_ROWS, QuantResult, assemble, row_losses


def rtn_quantize(
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
    """Round every weight to its static grid, ignoring H for the codes.

    H still gives the loss, and the bound reported is the Babai bound of the same grid in the
    decode sequence ``cfg.order`` names for GPTQ, so RTN's loss can be read against it.
    ``factor``: :func:`rtn_factor`'s ``((P, D), damp)``, computed once for several row blocks.
    ``levels``: a codebook the pinned grid's codes index (``q = s (levels[z] - o)``).
    """
    t0 = time.perf_counter()
    W0 = W
    W, h = prepare_diagonal(W, H)

    (P, D), damp = factor if factor is not None else rtn_factor(H, cfg, h)
    codes, S, Z, g_idx, clipped = _rounded(
        W, cfg, scales, zeros, min_zero, integer_zeros, levels, h
    )
    return assemble(
        W=W0, H=H, codes=codes, scales=S, zeros=Z, g_idx=g_idx, order=P, D=D,
        clipped=clipped, bits=cfg.bits, clip=cfg.clip, damp=damp, targets=W.clone(), t0=t0,
        levels=levels,
    )  # fmt: skip


def rtn_factor(
    H: torch.Tensor, cfg: QuantConfig, diagonal: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """The order GPTQ would use and the LDL diagonal in it: what RTN's bound reads of H."""

    def factor(hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        P = resolve_order_or_none(cfg.order, H, "gptq", hd)
        if P is None:
            return None
        D = ldl_diagonal(H, P.flip(0), hd)
        return None if D is None else (P, D)

    return with_damped_diagonal(diagonal, cfg.damp, factor)


def rtn_loss(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    *,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    min_zero: int = 0,
    integer_zeros: bool = True,
    levels: torch.Tensor | None = None,
) -> float:
    """RTN's total loss ``tr((W - Q) H (W - Q)^T)``, the same figure as
    ``rtn_quantize(...).proxy_loss`` without its bound: a baseline to read another method's loss
    against needs no factorization of H, which at 14336 columns costs gigabytes."""
    check_inputs(W, H)
    h, dead = solve_diagonal(H)
    total = 0.0
    for a in range(0, W.shape[0], LOSS_ROWS):  # rows are independent: no W-sized temporaries
        b = min(a + LOSS_ROWS, W.shape[0])
        Wd = W[a:b].clone()
        Wd[:, dead] = 0  # as prepare_diagonal() does, so a fitted grid is the same
        rows = (None, None) if scales is None else (scales[a:b], zeros[a:b])
        codes, S, Z, g_idx, _ = _rounded(Wd, cfg, *rows, min_zero, integer_zeros, levels, h)
        Q = dequantize(codes, S, Z, g_idx, levels).to(W.dtype)
        total += float(row_losses(W[a:b], H, Q).sum())
    return total


def _rounded(
    W: torch.Tensor,
    cfg: QuantConfig,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    min_zero: int = 0,
    integer_zeros: bool = True,
    levels: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Codes of W on its static grid (given or fitted on the Hessian's diagonal ``h``), the
    grid, and the clipped count."""
    g_idx = group_index(W.shape[1], cfg.group_size).to(W.device)
    S, Z = static_grid(W, cfg, scales, zeros, min_zero, integer_zeros, h)
    if levels is not None:  # a codebook: the nearest of its levels
        check_codebook(levels, scales)
        u = W / S[:, g_idx] + Z[:, g_idx]
        return nearest_level(u, levels)[0], S, Z, g_idx, outside_levels(u, levels)
    raw = round_to_grid(W, S[:, g_idx], Z[:, g_idx], cfg.maxq, clip=False)
    clipped = int(((raw < 0) | (raw > cfg.maxq)).sum()) if cfg.clip else 0
    codes = raw.clamp(0, cfg.maxq) if cfg.clip else raw
    return codes, S, Z, g_idx, clipped
