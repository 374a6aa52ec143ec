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

from latticequant.core.hessian import cholesky_lower, with_damping

__all__ = ["output_target"]


def output_target(
    W: torch.Tensor, H_tilde: torch.Tensor, C: torch.Tensor, damp: float = 0.01
) -> tuple[torch.Tensor, float]:
    """The float-outputs target ``W + W (C - H~)(H~ + lambda I)^{-1}`` in float64, and the
    relative damping used (``lambda = damp * mean(diag H~)``, raised until H~ factors).

    W: ``(d_out, d_in)``; H_tilde: the Gram matrix of the quantized inputs; C: the cross Gram
    ``X^T X~`` of the float inputs with them (same token normalisation).
    """
    d_in = W.shape[1]
    for name, M in (("H_tilde", H_tilde), ("C", C)):
        if M.shape != (d_in, d_in):
            raise ValueError(f"{name} must be {d_in}x{d_in}, got {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise ValueError(f"{name} contains NaN or Inf")
    W64, H64, C64 = (t.to(torch.float64) for t in (W, H_tilde, C))
    dead = torch.diagonal(H64) == 0
    if dead.any():  # inputs that never fire in the quantized model: nothing to correct there
        H64 = H64.clone()
        idx = dead.nonzero().flatten()
        H64[idx, idx] = 1.0
    L, used = with_damping(H64, damp, cholesky_lower)
    drift = W64 @ (C64 - H64)  # (d_out, d_in): rows of W (C - H~)
    drift[:, dead] = 0
    correction = torch.cholesky_solve(drift.mT, L).mT
    return W64 + correction, used
