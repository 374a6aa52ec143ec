"""Round-to-nearest on the same grids: the baseline every decoder is measured against."""

from __future__ import annotations

import time

import torch

from latticequant.core.config import QuantConfig
from latticequant.core.grid import group_index, round_to_grid, static_grid
from latticequant.core.hessian import prepare, with_damping
from latticequant.core.order import ldl_diagonal, resolve_order_or_none
from latticequant.core.result import QuantResult, assemble


def rtn_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    *,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> QuantResult:
    """Round every weight to its static grid, ignoring H for the codes.

    H still gives the loss, and the bound reported is the Babai bound of the same grid in the
    decode sequence ``cfg.order`` names for GPTQ, so RTN's loss can be read against it.
    """
    t0 = time.perf_counter()
    W0 = W
    W, H64 = prepare(W, H)

    def factor(Hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        P = resolve_order_or_none(cfg.order, Hd, "gptq")
        if P is None:
            return None
        D = ldl_diagonal(Hd, P.flip(0))
        return None if D is None else (P, D)

    (P, D), damp = with_damping(H64, cfg.damp, factor)
    g_idx = group_index(W.shape[1], cfg.group_size).to(W.device)
    S, Z = static_grid(W, cfg, scales, zeros)
    s, z = S[:, g_idx], Z[:, g_idx]
    raw = round_to_grid(W, s, z, cfg.maxq, clip=False)
    clipped = int(((raw < 0) | (raw > cfg.maxq)).sum()) if cfg.clip else 0
    codes = raw.clamp(0, cfg.maxq) if cfg.clip else raw
    return assemble(
        W=W0, H=H, codes=codes, scales=S, zeros=Z, g_idx=g_idx, order=P, D=D,
        clipped=clipped, bits=cfg.bits, clip=cfg.clip, damp=damp, targets=W.clone(), t0=t0,
    )  # fmt: skip
