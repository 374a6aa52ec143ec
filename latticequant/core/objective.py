"""Which point each layer's lattice problem aims at: its own weights, or the float model's outputs.

The layer objective (docs/theory.md §1, Eq. (4)) is ``||X~ (Q - W)^T||^2``: the quantized layer
should reproduce what the float weights would compute *on the inputs it actually receives*,
``X~``, which already went through quantized layers. What the model needs is the float model's
output ``X W^T`` on the float inputs ``X``. For one row ``w``:

    ||X~ q - X w||^2 = (q - t)^T H~ (q - t) + const,   t = H~^{-1} X~^T X w,

with ``H~ = X~^T X~ / n``. So the float-outputs objective is the same lattice (the same Gram
matrix ``H~``) with the target moved to ``T = W C H~^{-1}``, ``C = X^T X~ / n``: every decoder
of the project solves it unchanged. The target is computed as the correction

    T = W + W (C - H~) (H~ + lambda I)^{-1},

which is ``W C H~^{-1}`` when ``lambda = 0`` and exactly ``W`` when the inputs have not drifted
(``C = H~``), so damping the solve never moves the target of an undisturbed layer.
"""

from __future__ import annotations

import torch

from latticequant.core.hessian import solve_diagonal, with_damped_diagonal
from latticequant.core.triangular import all_finite, cholesky_lower_, permuted

__all__ = ["output_factor", "output_target"]

#: Columns of ``W (C - H~)`` per step: the difference of the two Gram matrices is never formed
#: whole in float64 (1.6 GB each at 14336 inputs).
DRIFT_COLUMNS = 1024


def output_factor(
    H_tilde: torch.Tensor, C: torch.Tensor, damp: float = 0.01
) -> tuple[torch.Tensor, float]:
    """The lower Cholesky factor of ``H~ + lambda I`` in float64 (dead inputs on a unit
    diagonal) and the relative damping used, after checking both Gram matrices: what
    :func:`output_target` computes once for all the rows of a layer."""
    d_in = H_tilde.shape[0]
    for name, M in (("H_tilde", H_tilde), ("C", C)):
        if M.dim() != 2 or M.shape != (d_in, d_in):
            raise ValueError(f"{name} must be {d_in}x{d_in}, got {tuple(M.shape)}")
        if not all_finite(M):
            raise ValueError(f"{name} contains NaN or Inf")
    h, _ = solve_diagonal(H_tilde)
    natural = torch.arange(d_in, device=H_tilde.device)

    def factor(hd: torch.Tensor) -> torch.Tensor | None:
        L = permuted(H_tilde, natural, diagonal=hd, dtype=torch.float64)
        return L if cholesky_lower_(L) else None

    return with_damped_diagonal(h, damp, factor)


def output_target(
    W: torch.Tensor,
    H_tilde: torch.Tensor,
    C: torch.Tensor,
    damp: float = 0.01,
    factor: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, float]:
    """The float-outputs target ``W + W (C - H~)(H~ + lambda I)^{-1}`` in float64, and the
    relative damping used (``lambda = damp * mean(diag H~)``, raised until H~ factors).

    W: ``(d_out, d_in)``; H_tilde: the Gram matrix of the quantized inputs; C: the cross Gram
    ``X^T X~`` of the float inputs with them (same token normalisation). Neither is copied
    whole: the drift is taken a block of columns at a time and the factor is the only float64
    ``d_in x d_in`` matrix. Every row's target is its own: ``factor``, :func:`output_factor`'s
    result, lets a layer's row blocks share one factorization.
    """
    d_in = W.shape[1]
    if W.shape[1] != H_tilde.shape[0]:
        raise ValueError(f"H_tilde must be {d_in}x{d_in}, got {tuple(H_tilde.shape)}")
    L, used = factor if factor is not None else output_factor(H_tilde, C, damp)
    W64 = W.to(torch.float64)
    _, dead = solve_diagonal(H_tilde)  # inputs that never fire: nothing to correct there
    drift = torch.empty_like(W64)  # (d_out, d_in): rows of W (C - H~)
    for a in range(0, d_in, DRIFT_COLUMNS):
        b = min(a + DRIFT_COLUMNS, d_in)
        drift[:, a:b] = W64 @ (C[:, a:b].to(torch.float64) - H_tilde[:, a:b].to(torch.float64))
    drift[:, dead] = 0
    # drift (L L^T)^-1 by two triangular solves from the right: cholesky_solve copies L
    Y = torch.linalg.solve_triangular(L.mT, drift, upper=True, left=False)
    correction = torch.linalg.solve_triangular(L, Y, upper=False, left=False)
    return W64 + correction, used
