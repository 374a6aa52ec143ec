"""K-best (list) decoding of the Hessian lattice, and Klein's randomised nearest plane.

Babai's nearest plane (:mod:`latticequant.core.babai`) keeps one candidate while it decodes from
the last basis vector to the first. The K-best decoder keeps, for every row, the ``K``
candidates of lowest partial distance: at basis index ``i`` each kept candidate is extended by
the two integers of the box nearest to its projected target ``u_i = t_i / s_i + o_i`` and the
``K`` best of the ``2K`` children survive. The partial distance is the nearest-plane
decomposition of the damped objective (docs/theory.md §5, Eq. (13)),

    (w - q)^T (H + lambda I) (w - q) = sum_j D_j (t_j - q_j)^2,

so the last step's ranking is exact. Klein's sampler instead extends each of ``P`` independent
paths by one of the two integers at random, the nearer one the likelier
(``p(c) ~ exp(-(u - c)^2 / (2 sigma^2))``). Babai's own point is always among the final
candidates, so the loss of every row is never above Babai's; with ``beam=1`` and no paths the
codes are Babai's bit for bit (the decode runs the same products in the same order).

Memory stays bounded as in Babai's blocked decode: the residuals of the candidates are
``(d, rows, K)``; a block of ``block_size`` basis vectors receives the contribution of all
vectors decoded before it in one product, and the candidates' histories before the block are
reordered once per block, through the ancestor each survivor has at the block's start.
"""

from __future__ import annotations

import time

import torch

from latticequant.core.babai import babai_basis
from latticequant.core.config import QuantConfig
from latticequant.core.grid import (
    check_codebook,
    dequantize,
    group_index,
    nearest_level,
    static_grid,
)
from latticequant.core.hessian import prepare_diagonal
from latticequant.core.order import check_permutation
from latticequant.core.result import QuantResult, assemble, row_losses

__all__ = ["kbest_quantize", "KLEIN_SIGMA", "LIST_BLOCK"]

LIST_BLOCK = 32
"""Block of basis vectors when several candidates are decoded (speed only)."""

KLEIN_SIGMA = 0.3
"""Spread of Klein's sampler in code units: a target on an integer leaves it with probability
about 0.004, a target 0.3 from an integer rounds the other way with probability about 0.1."""


def _children(
    u: torch.Tensor, maxq: int, clip: bool, levels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest and the second-nearest integer to ``u`` (inside ``{0 .. maxq}`` when
    clipped): the two extensions of a candidate. On a codebook, the codes of the nearest level
    and of its neighbour on the other side of ``u``."""
    if levels is not None:
        first, value = nearest_level(u, levels)
        second = torch.where(u >= value, first + 1, first - 1).clamp(0, maxq)
        return first, torch.where(second == first, first + torch.where(first > 0, -1, 1), second)
    first = torch.round(u)
    if clip:
        first = first.clamp(0, maxq)
    second = torch.where(u >= first, first + 1, first - 1)
    if clip:
        second = torch.where(first <= 0, first + 1, second)
        second = torch.where(first >= maxq, first - 1, second)
    return first, second


def _was_clipped(u, first, clip: bool, levels: torch.Tensor | None):
    """1 where ``u`` lay off the grid (beyond the outer levels of a codebook), else 0."""
    if levels is not None:
        return ((u < levels[0]) | (u > levels[-1])).long()
    return (torch.round(u) != first).long() if clip else 0


def _level(code: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """The level a code stands for: itself on a uniform grid, ``levels[code]`` on a codebook."""
    return code if levels is None else levels.to(code.dtype)[code.long()]


def _best_children(first, second, t, s, z, cost, D_i, K: int, levels=None):
    """The ``K`` children of lowest objective among every candidate's two nearest codes:
    ``(codes, parents, costs)``, each ``(rows, K)``; a stable sort prefers nearest on ties."""
    options = torch.cat([first, second], dim=1)  # (rows, 2K): nearest ones first
    err = t.repeat(1, 2) - s * (_level(options, levels) - z)
    total = cost.repeat(1, 2) + D_i * (err.to(torch.float64) ** 2)
    total, pick = torch.sort(total, dim=1, stable=True)
    pick = pick[:, :K]
    return options.gather(1, pick), pick % K, total[:, :K]


def _beam_decode(
    x: torch.Tensor,
    Un: torch.Tensor,
    Dq: torch.Tensor,
    S_g: torch.Tensor,
    Z_g: torch.Tensor,
    g_of: list[int],
    cfg: QuantConfig,
    K: int,
    generator: torch.Generator | None = None,
    levels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode ``K`` candidates per row from basis index ``d-1`` down to ``0``.

    x: ``(d, rows)`` in basis order; S_g, Z_g: ``(groups, rows)``, basis index i on group
    ``g_of[i]``. Without a generator the ``K`` best children survive at each step (a stable
    sort prefers nearest children on ties, so ``K = 1`` is Babai); with one, each of the ``K``
    paths picks one child by Klein's rule. ``levels``: the codebook the codes index.
    Returns codes ``(d, rows, K)``, the damped objective ``(rows, K)`` and the count of clamped
    codes per candidate ``(rows, K)``.
    """
    d, rows = x.shape
    maxq = cfg.maxq
    E = torch.zeros(d, rows, K, dtype=x.dtype, device=x.device)  # residuals w_j - q_j
    codes = torch.zeros_like(E)
    cost = torch.zeros(rows, K, dtype=torch.float64, device=x.device)
    if generator is None and K > 1:
        cost[:, 1:] = torch.inf  # one root: the other slots fill at the first step
    clipped = torch.zeros(rows, K, dtype=torch.long, device=x.device)
    keep = torch.arange(K, device=x.device).expand(rows, K)
    for b in range(d, 0, -cfg.block_size):
        a = max(0, b - cfg.block_size)
        T = x[a:b, :, None].expand(b - a, rows, K)
        if b < d:
            T = T + (Un[a:b, b:] @ E[b:].reshape(d - b, rows * K)).reshape(b - a, rows, K)
        T = T.contiguous()
        anc = keep.clone()  # each candidate's ancestor among the block's first candidates
        for i in range(b - 1, a - 1, -1):
            t = T[i - a]
            if i + 1 < b:
                inner = Un[i, i + 1 : b] @ E[i + 1 : b].reshape(b - i - 1, rows * K)
                t = t + inner.reshape(rows, K)
            s, z = S_g[g_of[i]][:, None], Z_g[g_of[i]][:, None]
            u = t / s + z
            first, second = _children(u, maxq, cfg.clip, levels)
            was_clipped = _was_clipped(u, first, cfg.clip, levels)
            if generator is None and K == 1:  # nearest plane itself
                code, parent = first, keep
            elif generator is None:
                code, parent, cost = _best_children(first, second, t, s, z, cost, Dq[i], K, levels)
            else:
                d1, d2 = (u - _level(first, levels)) ** 2, (u - _level(second, levels)) ** 2
                p_second = torch.sigmoid((d1 - d2) / (2 * KLEIN_SIGMA**2))
                flip = torch.rand(u.shape, generator=generator, dtype=u.dtype) < p_second.cpu()
                code = torch.where(flip.to(u.device), second, first)
                parent = keep
                err = t - s * (_level(code, levels) - z)
                cost = cost + Dq[i] * (err.to(torch.float64) ** 2)
            if K > 1 and generator is None:  # only the block's decoded rows and its targets
                if i + 1 < b:
                    index = parent.expand(b - i - 1, rows, K)
                    E[i + 1 : b] = E[i + 1 : b].gather(2, index)
                    codes[i + 1 : b] = codes[i + 1 : b].gather(2, index)
                if i > a:
                    T[: i - a] = T[: i - a].gather(2, parent.expand(i - a, rows, K))
                anc = anc.gather(1, parent)
                clipped = clipped.gather(1, parent)
                if cfg.clip:
                    was_clipped = was_clipped.gather(1, parent)
            codes[i] = code
            E[i] = x[i][:, None] - s * (_level(code, levels) - z)
            clipped = clipped + was_clipped
        if b < d and K > 1 and generator is None:  # histories before the block, reordered once
            index = anc.expand(d - b, rows, K)
            E[b:] = E[b:].gather(2, index)
            codes[b:] = codes[b:].gather(2, index)
    return codes, cost, clipped


def kbest_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: QuantConfig,
    *,
    beam: int = 4,
    klein_paths: int = 0,
    seed: int = 0,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    min_zero: int = 0,
    factor: tuple | None = None,
    integer_zeros: bool = True,
    levels: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize W (d_out, d_in) by K-best decoding on the lattice of H, every row at once.

    ``cfg.order`` is the basis order, as for :func:`~latticequant.babai_quantize`; the grid is
    the static one (``cfg.static_groups`` must be true: a grid refitted along the decode would
    differ between candidates). ``klein_paths`` randomised nearest-plane paths (seeded by
    ``seed``) join the candidates. Each row keeps the candidate of lowest loss
    ``(w - q)^T H (w - q)`` among the K-best winner, Babai's point and the paths.
    ``factor``: :func:`~latticequant.core.babai.babai_basis`'s result, as for Babai.
    ``levels``: a codebook the pinned grid's codes index, ``q = s (levels[z] - o)``.
    """
    check_codebook(levels, scales)
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be a positive integer, got {beam!r}")
    if isinstance(klein_paths, bool) or not isinstance(klein_paths, int) or klein_paths < 0:
        raise ValueError(f"klein_paths must be a non-negative integer, got {klein_paths!r}")
    if not cfg.static_groups and cfg.group_size != -1 and scales is None:
        raise ValueError(
            "K-best decoding needs a grid fixed before the decode: use static_groups=True "
            "(--static-groups)"
        )
    t0 = time.perf_counter()
    if isinstance(cfg.order, torch.Tensor):
        check_permutation(cfg.order, H.shape[0] if H.dim() == 2 else -1)
    W0 = W
    W, h = prepare_diagonal(W, H)
    d_out, d = W.shape
    (Q, Un, u), damp = factor if factor is not None else babai_basis(H, cfg, h, W.dtype)
    g_idx = group_index(d, cfg.group_size).to(W.device)
    S, Z = static_grid(W, cfg, scales, zeros, min_zero, integer_zeros, h)
    Dq = u**2
    S_g, Z_g, g_of = S.T.contiguous(), Z.T.contiguous(), g_idx[Q].tolist()
    x = W[:, Q].T.contiguous()

    runs = [_beam_decode(x, Un, Dq, S_g, Z_g, g_of, cfg, 1, levels=levels)]  # Babai's point
    # Several candidates: short blocks keep the per-step reordering of the block cheap.
    narrow = cfg.replace(block_size=min(cfg.block_size, LIST_BLOCK))
    if beam > 1:
        codes, _, clipped = _beam_decode(x, Un, Dq, S_g, Z_g, g_of, narrow, beam, levels=levels)
        runs.append((codes[..., :1], None, clipped[:, :1]))  # the best survivor
    if klein_paths:
        generator = torch.Generator().manual_seed(int(seed))
        runs.append(_beam_decode(x, Un, Dq, S_g, Z_g, g_of, narrow, klein_paths, generator, levels))
    codes_q = torch.cat([r[0] for r in runs], dim=2)  # (d, rows, candidates)
    clipped_c = torch.cat([r[2] for r in runs], dim=1)
    codes_all = torch.empty_like(codes_q)
    codes_all[Q] = codes_q
    S64, Z64, W64, H0 = (t.to(torch.float64) for t in (S, Z, W0, H))
    losses = [  # the undamped loss of every candidate, row by row
        row_losses(
            W64, H0, dequantize(codes_all[:, :, c].T.to(torch.float64), S64, Z64, g_idx, levels)
        )
        for c in range(codes_all.shape[2])
    ]
    best = torch.stack(losses, dim=1).argmin(dim=1)  # ties keep the earliest: Babai's point
    rows = torch.arange(d_out, device=W.device)
    codes = codes_all[:, rows, best].T.contiguous()
    D = torch.empty(d, dtype=torch.float64, device=W.device)
    D[Q] = Dq
    return assemble(
        W=W0, H=H, codes=codes, scales=S, zeros=Z, g_idx=g_idx, order=Q, D=D,
        clipped=int(clipped_c[rows, best].sum()), bits=cfg.bits, clip=cfg.clip, damp=damp,
        targets=None, t0=t0, levels=levels,
    )  # fmt: skip
