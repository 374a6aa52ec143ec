"""What every core quantizer returns: codes, the grid, and the numbers of the error bound."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from latticequant.core.grid import dequantize
from latticequant.core.lattice import error_bound


@dataclass
class QuantResult:
    """Codes and grid of one weight matrix, in the original column order.

    ``Q = scales[:, g_idx] * (codes - zeros[:, g_idx])``.
    loss: per row ``(w - q)^T H (w - q)`` on the H given (undamped).
    bound: per row ``1/4 * sum_j D_jj s_j^2`` on the damped H that was decoded on; it holds
      whenever ``clipped == 0``.
    clipped: codes that were clamped to ``{0 .. 2^b - 1}`` (only with ``clip=True``).
    overflow: codes outside ``{0 .. 2^b - 1}`` (only with ``clip=False``).
    D: the LDL diagonal of the damped H in Babai's processing order, indexed by column.
    targets: the error-updated weight each code was rounded from (GPTQ's updated weight,
      Babai's projected target), original column order; what SSQR stores for an outlier.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    Q: torch.Tensor
    order: torch.Tensor
    loss: torch.Tensor
    bound: torch.Tensor
    clipped: int
    overflow: int
    damp: float
    D: torch.Tensor
    bits: int
    targets: torch.Tensor | None = None
    time_s: float = 0.0

    @property
    def proxy_loss(self) -> float:
        """``tr((W - Q) H (W - Q)^T)``, the layer's total loss."""
        return float(self.loss.sum())


#: Rows of the projected loss taken at a time.
LOSS_ROWS = 256
#: Columns of H converted and multiplied at a time: neither H in ``W - Q``'s dtype nor the
#: product ``(W - Q) H`` is ever whole (at 14336 columns each would be gigabytes).
LOSS_COLUMNS = 1024


def row_losses(W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``(w - q)^T H (w - q)`` of every row, in the dtype of ``W - Q`` (docs/theory.md Eq. (4)),
    ``LOSS_COLUMNS`` columns of H at a time."""
    E = W - Q
    out = torch.zeros(E.shape[0], dtype=E.dtype, device=E.device)
    for a in range(0, E.shape[1], LOSS_COLUMNS):
        b = min(a + LOSS_COLUMNS, E.shape[1])
        out += ((E @ H[:, a:b].to(E.dtype)) * E[:, a:b]).sum(dim=1)
    return out


def assemble(
    *,
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    order: torch.Tensor,
    D: torch.Tensor,
    clipped: int,
    bits: int,
    clip: bool,
    damp: float,
    targets: torch.Tensor | None,
    t0: float,
    projected: tuple[torch.Tensor, float] | None = None,
    levels: torch.Tensor | None = None,
) -> QuantResult:
    """Dequantize, and measure the loss and the bound that every quantizer reports.

    ``projected = (W', lambda)`` says that ``targets`` are the projected targets of a
    nearest-plane decode of W' (W with dead columns zeroed) on ``H' + lambda I``. The loss then
    comes from the decomposition ``(w - q)^T (H' + lambda I) (w - q) = sum_j D_j (t_j - q_j)^2``
    (docs/theory.md §5, Eq. (13)) less ``lambda ||w - q||^2``, instead of a (d_out, d_in, d_in)
    product that would cost twice the decode itself. ``levels``: the codebook the codes index.
    """
    Q = dequantize(codes, scales, zeros, g_idx, levels).to(W.dtype)
    if projected is None:
        loss = row_losses(W, H, Q)
    else:
        Wd, lam = projected
        D64 = D.to(torch.float64)
        loss = torch.empty(W.shape[0], dtype=torch.float64, device=W.device)
        for a in range(0, W.shape[0], LOSS_ROWS):  # row blocks: no W-sized temporaries
            b = min(a + LOSS_ROWS, W.shape[0])
            r = (targets[a:b] - Q[a:b]).to(torch.float64)
            E = (Wd[a:b] - Q[a:b]).to(torch.float64)
            loss[a:b] = (r * r) @ D64 - lam * (E * E).sum(dim=1)
        loss = loss.to(W.dtype)
    bound = error_bound(D, scales, g_idx).to(W.dtype)
    maxq = (1 << bits) - 1
    overflow = 0 if clip else int(((codes < 0) | (codes > maxq)).sum())
    return QuantResult(
        codes=codes.to(torch.int64),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        Q=Q,
        order=order,
        loss=loss,
        bound=bound,
        clipped=int(clipped),
        overflow=overflow,
        damp=damp,
        D=D,
        bits=bits,
        targets=targets,
        time_s=time.perf_counter() - t0,
    )
