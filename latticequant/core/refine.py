"""Refining a decoded result: coordinate descent on the codes, least squares on the scales.

Both steps lower the layer's loss ``L = (w - q)^T H (w - q)`` of every row and never raise it.

Coordinate descent: with the residual ``r = H (w - q)`` kept up to date, moving code ``c_j`` by
``k`` moves ``q_j`` by ``delta = s_j k`` and changes the loss by ``-2 delta r_j + delta^2 H_jj``,
so the best integer move is ``k = round(r_j / (H_jj s_j))`` (clamped to the box): a closed form
from H's column and diagonal. A sweep visits every column once; columns go in blocks, the
residual of the block's own columns is updated move by move and the rest once per block, so a
sweep costs ``O(d_in^2)`` per row, every row at once.

Scales with the codes fixed: ``q = A s`` is linear in the row's group scales, so the best scales
solve the ``G x G`` normal equations ``(A^T H A) s = A^T H w``. For asymmetric grids the offsets
join (``q_j = s_g c_j - t_g``), the offset ``t_g / s_g`` is rounded to the nearest integer the
format can store, and the scales are solved again for it. The new scales are rounded to the
stored dtype (float16) and kept, row by row, only where the loss then is lower.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from latticequant.core.config import REFINE_STEPS, QuantConfig
from latticequant.core.grid import dequantize, nearest_level
from latticequant.core.result import QuantResult, row_losses

__all__ = ["refine", "REFINE_STEPS", "coordinate_descent", "refit_scales"]


def _losses(W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return row_losses(W.to(torch.float64), H.to(torch.float64), Q.to(torch.float64))


def coordinate_descent(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    cfg: QuantConfig,
    sweeps: int = 1,
    block: int = 128,
    levels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Codes after up to ``sweeps`` sweeps of exact single-coordinate moves (float64).

    Stops early after a sweep that moves nothing, which is then a point no single move
    improves. Returns ``(codes, sweeps run)``. ``levels``: a codebook the codes index
    (``q = s (levels[z] - o)``); a move goes to the level nearest the coordinate's optimum.
    """
    W, H = W.to(torch.float64), H.to(torch.float64)
    codes = codes.to(torch.float64).clone()
    s = scales.to(torch.float64)[:, g_idx]
    z = zeros.to(torch.float64)[:, g_idx]
    L = None if levels is None else levels.to(torch.float64)

    def level(c: torch.Tensor) -> torch.Tensor:
        return c if L is None else L[c.long()]

    R = (W - s * (level(codes) - z)) @ H  # r = H (w - q), one row per output row
    diag = torch.diagonal(H)
    d = W.shape[1]
    done = 0
    for _ in range(sweeps):
        done += 1
        moved = 0
        for a in range(0, d, block):
            b = min(d, a + block)
            step = torch.zeros(W.shape[0], b - a, dtype=torch.float64, device=W.device)
            for j in range(a, b):
                if diag[j] <= 0:  # an input that never fires: its weight changes nothing
                    continue
                c = codes[:, j]
                target = level(c) + R[:, j] / (diag[j] * s[:, j])
                if L is not None:
                    new = nearest_level(target, L)[0]
                else:
                    new = torch.round(target)
                    if cfg.clip:
                        new = new.clamp(0, cfg.maxq)
                delta = s[:, j] * (level(new) - level(c))
                gain = 2 * delta * R[:, j] - delta * delta * diag[j]
                take = (new != c) & (gain > 0)
                if not bool(take.any()):
                    continue
                delta = torch.where(take, delta, torch.zeros_like(delta))
                codes[:, j] = torch.where(take, new, c)
                R[:, a:b] -= delta[:, None] * H[j, a:b]
                step[:, j - a] = delta
                moved += int(take.sum())
            if b - a and bool(step.any()):  # the rest of the residual, once per block
                update = step @ H[a:b]
                R[:, :a] -= update[:, :a]
                R[:, b:] -= update[:, b:]
        if moved == 0:
            break
    return codes, done


def _normal_equations(
    features: list[torch.Tensor],
    H: torch.Tensor,
    W: torch.Tensor,
    groups: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = A^T H A`` and ``v = A^T H w`` per row for ``q = A x``, where unknown ``(f, g)``
    multiplies feature ``f`` (rows x d_in) on the columns of group ``g``."""
    n_f, G = len(features), len(groups)
    rows = W.shape[0]
    M = torch.zeros(rows, n_f * G, n_f * G, dtype=torch.float64, device=W.device)
    v = torch.zeros(rows, n_f * G, dtype=torch.float64, device=W.device)
    HW = W @ H
    for g, cols_g in enumerate(groups):
        for f, F in enumerate(features):
            Fg = F[:, cols_g]
            v[:, f * G + g] = (Fg * HW[:, cols_g]).sum(dim=1)
            for h, cols_h in enumerate(groups):
                FH = Fg @ H[cols_g][:, cols_h]
                for f2, F2 in enumerate(features):
                    M[:, f * G + g, f2 * G + h] = (FH * F2[:, cols_h]).sum(dim=1)
    return M, v


def _solve(M: torch.Tensor, v: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Batched ``M x = v``; unknowns no column depends on keep ``fallback``."""
    M, v = M.clone(), v.clone()
    idle = torch.diagonal(M, dim1=1, dim2=2) <= 0
    if bool(idle.any()):
        r, k = idle.nonzero(as_tuple=True)
        M[r, k, :] = 0
        M[r, :, k] = 0
        M[r, k, k] = 1
        v[r, k] = fallback[r, k]
    x = torch.linalg.solve(M, v.unsqueeze(-1)).squeeze(-1)
    return torch.where(torch.isfinite(x), x, fallback)


def refit_scales(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    cfg: QuantConfig,
    scale_dtype: torch.dtype = torch.float16,
    min_zero: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales (and, asymmetric, integer offsets) that minimise every row's loss with the
    codes fixed, rounded to ``scale_dtype``; a row keeps its old grid unless the loss falls.
    ``min_zero``: the smallest offset the storage holds."""
    W, H = W.to(torch.float64), H.to(torch.float64)
    codes = codes.to(torch.float64)
    G = scales.shape[1]
    groups = [(g_idx == g).nonzero().flatten() for g in range(G)]
    old_s, old_z = scales.to(torch.float64), zeros.to(torch.float64)
    s_new, z_new = old_s, old_z
    if not cfg.sym:
        # q_j = s_g c_j - t_g: joint least squares, then the nearest storable integer offset
        ones = torch.ones_like(codes)
        M, v = _normal_equations([codes, -ones], H, W, groups)
        x = _solve(M, v, torch.cat([old_s, old_s * old_z], dim=1))
        s_joint, t_joint = x[:, :G], x[:, G:]
        ok = s_joint > 0
        z_new = torch.where(ok, torch.round(t_joint / s_joint), old_z)
        z_new = z_new.clamp(min_zero, cfg.maxq)
    M, v = _normal_equations([codes - z_new[:, g_idx]], H, W, groups)
    s_new = _solve(M, v, old_s).to(scale_dtype).to(torch.float64)
    good = (s_new > 0) & torch.isfinite(s_new)
    s_new = torch.where(good, s_new, old_s)
    before = _losses(W, H, dequantize(codes, old_s, old_z, g_idx))
    after = _losses(W, H, dequantize(codes, s_new, z_new, g_idx))
    better = (after < before)[:, None]
    return torch.where(better, s_new, old_s), torch.where(better, z_new, old_z)


def refine(
    W: torch.Tensor,
    H: torch.Tensor,
    result: QuantResult,
    cfg: QuantConfig,
    steps: tuple[str, ...] = REFINE_STEPS,
    sweeps: int = 1,
    rounds: int = 1,
    scale_dtype: torch.dtype = torch.float16,
    min_zero: int = 0,
    levels: torch.Tensor | None = None,
) -> tuple[QuantResult, dict[str, float]]:
    """``result`` refined by ``steps`` (``"cd"``, ``"scales"``), alternated for up to ``rounds``
    rounds until the loss stops falling; returns the new result and what each step removed.

    The scales are first rounded to ``scale_dtype`` (what a checkpoint stores), so every loss
    here, the starting one included, is the loss of the stored weights. The result's ``bound``
    and ``D`` stay those of the decode it started from. ``levels``: the codebook the codes
    index, which only ``"cd"`` moves on (the scales of a codebook grid stay as given).
    """
    if levels is not None and "scales" in steps:
        raise ValueError("refine 'scales' re-solves a uniform grid; a codebook grid takes 'cd'")
    unknown = [s for s in steps if s not in REFINE_STEPS]
    if unknown or not steps:
        raise ValueError(f"refine steps must be some of {REFINE_STEPS}, got {list(steps)}")
    for name, value in (("sweeps", sweeps), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"refine {name} must be a positive integer, got {value!r}")
    t0 = time.perf_counter()
    W64, H64 = W.to(torch.float64), H.to(torch.float64)
    codes = result.codes.to(torch.float64)
    scales = result.scales.to(scale_dtype).to(torch.float64)
    zeros = result.zeros.to(torch.float64)
    g = result.g_idx

    def loss() -> float:
        return float(_losses(W64, H64, dequantize(codes, scales, zeros, g, levels)).sum())

    start = loss()
    removed = dict.fromkeys(steps, 0.0)
    current = start
    for _ in range(rounds):
        round_start = current
        for step in steps:
            if step == "cd":
                codes, _ = coordinate_descent(
                    W64, H64, codes, scales, zeros, g, cfg, sweeps, levels=levels
                )
            else:
                scales, zeros = refit_scales(
                    W64, H64, codes, scales, zeros, g, cfg, scale_dtype, min_zero
                )
            new = loss()
            removed[step] += current - new
            current = new
        if current >= round_start * (1 - 1e-12):
            break
    Q = dequantize(codes, scales, zeros, g, levels).to(W.dtype)
    out = replace(
        result,
        codes=codes.to(torch.int64),
        scales=scales.to(result.scales.dtype),
        zeros=zeros.to(result.zeros.dtype),
        Q=Q,
        loss=_losses(W64, H64, Q).to(result.loss.dtype),
        targets=None,
        time_s=result.time_s + time.perf_counter() - t0,
    )
    stats = {"loss_before_refine": start}
    stats.update({f"refine_{k}_removed": v for k, v in removed.items()})
    return out, stats
