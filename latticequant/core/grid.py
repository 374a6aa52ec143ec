"""Quantization grids: per-row, per-group scales ``s`` and offsets ``o`` with ``q = s * (z - o)``.

docs/theory.md §1, Eq. (3). A grid is fitted on a block of columns of W (one scale per row); a
layer's grid is the concatenation over its groups, column ``j`` belonging to group
``g_idx[j] = j // g``.
"""

from __future__ import annotations

import torch

from latticequant.core.config import QuantConfig


def n_groups(d_in: int, group_size: int) -> int:
    """Number of groups; the last one is shorter when ``group_size`` does not divide ``d_in``."""
    return 1 if group_size == -1 else -(-d_in // group_size)


def group_index(d_in: int, group_size: int) -> torch.Tensor:
    """``g_idx[j] = j // group_size`` (all zeros for per-channel grids)."""
    if group_size == -1:
        return torch.zeros(d_in, dtype=torch.long)
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    return torch.arange(d_in) // group_size


def _minmax(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset mapping ``[xmin, xmax]`` (which contains 0) onto ``{0 .. maxq}``.

    An asymmetric offset that would round below ``min_zero`` is raised to it, and the scale
    refitted so that ``[xmin, xmax]`` still lies on the grid: with offset ``m`` the grid spans
    ``[-m s, (maxq - m) s]``, so ``s = max(xmax / (maxq - m), -xmin / m)``.
    """
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        if min_zero > 0:
            low = zero < min_zero
            refit = torch.maximum(xmax / (maxq - min_zero), -xmin / min_zero)
            scale = torch.where(low, refit, scale)
            zero = torch.where(low, torch.full_like(zero, min_zero), zero)
    return scale, zero


def round_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, clip: bool = True
) -> torch.Tensor:
    """Integer codes ``z = round(x / s + o)`` (clamped to ``{0 .. maxq}`` when ``clip``)."""
    z = torch.round(x / scale + zero)
    return z.clamp_(0, maxq) if clip else z


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and values of the nearest of a codebook's ``levels`` (sorted, in units of the
    scale) to ``u = x / s + o``: a non-uniform one-dimensional lattice (GGUF's IQ4_NL) rounds
    like a uniform one, ``q = s (levels[z] - o)`` instead of ``q = s (z - o)``."""
    mid = (levels[1:] + levels[:-1]) / 2
    code = torch.bucketize(u, mid.to(u.dtype))
    return code.to(u.dtype), levels.to(u.dtype)[code]


def outside_levels(u: torch.Tensor, levels: torch.Tensor) -> int:
    """How many of ``u`` lie beyond the codebook's outer levels (a codebook's clipping)."""
    return int(((u < levels[0]) | (u > levels[-1])).sum())


def snap(
    u: torch.Tensor, maxq: int, clip: bool, levels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(code, level, clipped)`` of the grid point nearest ``u = x / s + o``: on the uniform
    grid the rounded code (clamped to ``{0 .. maxq}`` when ``clip``) is its own level; on a
    codebook the index of the nearest of its ``levels`` and that level. ``q = s (level - o)``."""
    if levels is not None:
        code, value = nearest_level(u, levels)
        return code, value, outside_levels(u, levels)
    code = torch.round(u)
    clipped = 0
    if clip:
        clipped = int(((code < 0) | (code > maxq)).sum())
        code.clamp_(0, maxq)
    return code, code, clipped


def check_codebook(levels: torch.Tensor | None, scales: torch.Tensor | None) -> None:
    """A codebook's codes index levels of a grid fixed before the decode: refuse one without."""
    if levels is not None and scales is None:
        raise ValueError("a codebook grid needs a static grid (scales and zeros)")


def fit_rows(
    x: torch.Tensor, cfg: QuantConfig, min_zero: int = 0, h: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One grid per row of ``x`` (d_out, k), by min-max or by shrinking the range.

    The range always contains 0, so the offset of an asymmetric grid is a valid code (at least
    ``min_zero``, the smallest offset the grid's storage holds). The MSE
    search shrinks ``[xmin, xmax]`` by ``p = 1, 1 - 1/grid, ...`` down to ``1 - maxshrink`` and
    keeps, per row, the scale with the smallest ``sum |q - x|^norm`` (clipped codes). The
    ``"hessian"`` search shrinks the same way and keeps the smallest ``sum_j h_j (q_j - x_j)^2``,
    ``h`` (k,) being the Hessian's diagonal on these columns: the diagonal part of the row
    objective ``(w - q)^T H (w - q)`` (docs/theory.md §1, Eq. (4)), the importance weighting
    llama.cpp's block fits use.
    """
    weighted = cfg.scale_method == "hessian"
    if weighted and (h is None or h.shape != x.shape[1:]):
        raise ValueError("scale_method 'hessian' needs the Hessian's diagonal on the columns")
    maxq = cfg.maxq
    if isinstance(min_zero, bool) or not isinstance(min_zero, int) or not 0 <= min_zero < maxq:
        raise ValueError(f"min_zero must be an integer from 0 to {maxq - 1}, got {min_zero!r}")
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    scale, zero = _minmax(xmin, xmax, maxq, cfg.sym, min_zero)
    if cfg.scale_method == "minmax":
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(cfg.mse_maxshrink * cfg.mse_grid)):
        p = 1 - i / cfg.mse_grid
        s1, z1 = _minmax(p * xmin, p * xmax, maxq, cfg.sym, min_zero)
        q = s1[:, None] * (round_to_grid(x, s1[:, None], z1[:, None], maxq) - z1[:, None])
        if weighted:
            err = (q - x).square_() @ h.to(x.dtype)
        else:
            err = (q - x).abs_().pow_(cfg.mse_norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def fit_grid(
    W: torch.Tensor, cfg: QuantConfig, min_zero: int = 0, h: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static grid of the whole layer: ``(scales, zeros)``, each of shape (d_out, n_groups).
    ``h``: the Hessian's diagonal (d_in,), read by ``scale_method="hessian"`` only."""
    d_in = W.shape[1]
    g = d_in if cfg.group_size == -1 else cfg.group_size
    pieces = [
        fit_rows(W[:, a : a + g], cfg, min_zero, None if h is None else h[a : a + g])
        for a in range(0, d_in, g)
    ]
    scales = torch.stack([s for s, _ in pieces], dim=1)
    zeros = torch.stack([z for _, z in pieces], dim=1)
    return scales, zeros


DEQUANT_ROWS = 256


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q = scales[:, g_idx] * (codes - zeros[:, g_idx])`` in the scales' dtype, a block of
    ``DEQUANT_ROWS`` rows at a time: the per-weight scales and zeros are never whole. With a
    codebook ``levels``, a code stands for ``levels[code]``."""
    dtype = torch.promote_types(scales.dtype, zeros.dtype)
    Q = torch.empty(codes.shape, dtype=dtype, device=scales.device)
    for a in range(0, codes.shape[0], DEQUANT_ROWS):
        b = min(a + DEQUANT_ROWS, codes.shape[0])
        z = zeros[a:b][:, g_idx]
        c = codes[a:b] if levels is None else levels.to(scales.device)[codes[a:b].long()]
        Q[a:b] = scales[a:b][:, g_idx] * (c.to(scales.dtype) - z)
    return Q


def static_grid(
    W: torch.Tensor,
    cfg: QuantConfig,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    min_zero: int = 0,
    integer_zeros: bool = True,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid fixed before any update: fitted on W (``h``: the Hessian's diagonal, which
    ``scale_method="hessian"`` weights the fit by), or pinned by the caller.

    Pinned scales let a method choose the grid itself (one scale per matrix for HPTQ, a
    common factor for SSQR). ``zeros`` may be omitted for a symmetric grid.

    ``integer_zeros=False`` takes a pinned grid as a file format defines it (GGUF's K types:
    ``q = s * (z - o)`` with ``o = dmin * m / (d * sc)``): real offsets, and scales of either
    sign (a negative ``sc``), only nonzero. Rounding ``w / s + o`` to the nearest code in
    ``{0 .. maxq}`` still picks the nearest level, the levels being ``|s|`` apart.
    """
    d_out, d_in = W.shape
    shape = (d_out, n_groups(d_in, cfg.group_size))
    if scales is None:
        if zeros is not None:
            raise ValueError("zeros were given without scales")
        return fit_grid(W, cfg, min_zero, h)
    scales = torch.as_tensor(scales, dtype=W.dtype, device=W.device)
    if scales.shape != shape:
        raise ValueError(f"scales must have shape {shape}, got {tuple(scales.shape)}")
    if not torch.isfinite(scales).all():
        raise ValueError("scales must be finite")
    if integer_zeros and not (scales > 0).all():
        raise ValueError("scales must be positive")
    if not (scales != 0).all():
        raise ValueError("scales must be nonzero")
    if zeros is None:
        if not cfg.sym:
            raise ValueError("an asymmetric grid needs zeros along with scales")
        zeros = torch.full(shape, float((cfg.maxq + 1) // 2), dtype=W.dtype, device=W.device)
    zeros = torch.as_tensor(zeros, dtype=W.dtype, device=W.device)
    if zeros.shape != shape:
        raise ValueError(f"zeros must have shape {shape}, got {tuple(zeros.shape)}")
    if not torch.isfinite(zeros).all():
        raise ValueError("zeros must be finite")
    if integer_zeros and not torch.equal(zeros, torch.round(zeros)):
        raise ValueError("zeros must be integers (integer_zeros=False takes real offsets)")
    return scales, zeros
