"""Hessians ``H = X^T X / n`` from streamed activations, and their damped factorisation.

docs/theory.md §1, Eq. (4): the row objective is ``(w - q)^T H (w - q) = ||X (w - q)||^2 / n``;
constant factors change no decision, so H is the mean over tokens. Damping ``lambda = damp *
mean(diag H)`` keeps the lattice basis full rank; it is raised step by step when the Cholesky
factorisation fails, and the value actually used is returned so that it can be reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

MAX_DAMP = 10.0


GRAM_TILE = 384  # column tiles of at least this width when only the upper triangle is summed


def _add_gram_upper(S: torch.Tensor, x: torch.Tensor) -> None:
    """``S += x^T x`` on the diagonal tiles and the tiles above them only.

    The Gram matrix is symmetric, so the tiles below the diagonal are never computed: with 4
    tiles (d_in >= 1536) that is 10 products of 16, about a third less work, which is most
    of the calibration pass's cost after the forward itself.
    """
    d = x.shape[1]
    n_tiles = max(1, min(4, d // GRAM_TILE))
    edges = [i * d // n_tiles for i in range(n_tiles + 1)]
    for i in range(n_tiles):
        a = slice(edges[i], edges[i + 1])
        for j in range(i, n_tiles):
            b = slice(edges[j], edges[j + 1])
            S[a, b].addmm_(x[:, a].T, x[:, b])


class HessianAccumulator:
    """Running ``sum_t x_t x_t^T`` over tokens, counted in tokens, never holding X itself.

    Only the upper triangle of the sum is kept up to date; :attr:`H` mirrors it, so H is
    exactly symmetric.
    """

    def __init__(
        self, d_in: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulator dtype must be float32 or float64, got {dtype}")
        self.d_in = d_in
        self.sum = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add activations ``x`` (..., d_in); ``mask`` (...) keeps only the tokens where True."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have {x.shape[-1]} features, expected {self.d_in}")
        x = x.reshape(-1, self.d_in)
        if mask is not None:
            mask = mask.reshape(-1).to(torch.bool)
            if mask.numel() != x.shape[0]:
                raise ValueError(f"mask has {mask.numel()} tokens, activations {x.shape[0]}")
            x = x[mask.to(x.device)]
        if x.shape[0] == 0:
            return
        x = x.to(device=self.sum.device, dtype=self.sum.dtype)
        _add_gram_upper(self.sum, x)
        self.n_tokens += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        """The mean Hessian ``X^T X / n`` in the accumulator's dtype."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were accumulated into this Hessian")
        upper = torch.triu(self.sum)
        return (upper + torch.triu(upper, 1).T) / self.n_tokens


def check_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming what is wrong with a weight matrix and its Hessian."""
    if not isinstance(W, torch.Tensor) or not isinstance(H, torch.Tensor):
        raise ValueError("W and H must be torch tensors")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (d_in, d_in), got shape {tuple(H.shape)}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(f"H is {H.shape[0]}x{H.shape[1]} but W has d_in = {W.shape[1]} columns")
    for name, t in (("W", W), ("H", H)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf")


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Inputs that never fire (``H_jj = 0``): their weights cannot matter to the loss."""
    return torch.diagonal(H) == 0


def prepare(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of W and H (float64 for H) with dead columns handled as the reference GPTQ does.

    A dead column gets ``H_jj = 1`` and weight 0, so it is quantized to exactly 0 and the basis
    stays full rank.
    """
    check_inputs(W, H)
    W = W.clone()
    H = H.to(torch.float64).clone()
    dead = dead_columns(H)
    if dead.any():
        idx = dead.nonzero().flatten()
        H[idx, idx] = 1.0
        W[:, dead] = 0
    return W, H


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I``."""
    lam = damp * torch.diagonal(H).mean()
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def with_damping(
    H: torch.Tensor, damp: float, factor: Callable[[torch.Tensor], T | None]
) -> tuple[T, float]:
    """Apply ``factor`` to the damped H, raising ``damp`` until it succeeds.

    ``factor`` returns None when the damped matrix is not usable (a failed Cholesky). Damping
    doubles (from at least 1e-3) until it succeeds; it gives up above ``MAX_DAMP``.
    """
    d = float(damp)
    while True:
        out = factor(damped(H, d))
        if out is not None:
            return out, d
        if d >= MAX_DAMP:
            raise ValueError(f"H is not positive definite even with damping {d:g} * mean(diag H)")
        d = max(2 * d, 1e-3)


def cholesky_lower(A: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of A, or None when A is not (numerically) positive definite."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0 or not torch.isfinite(L).all():
        return None
    return L


def cholesky_upper(A: torch.Tensor) -> torch.Tensor | None:
    """Upper factor ``R`` with ``R^T R = A``, or None when A is not positive definite."""
    L = cholesky_lower(A)
    return None if L is None else L.mT
