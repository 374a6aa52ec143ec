"""Small random weight matrices and Hessians shared by the core's tests."""

from __future__ import annotations

import torch


def correlated_hessian(d: int, n: int = 400, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """H = X^T X / n from activations mixed by a random matrix (real correlation)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=dtype)
    A = torch.randn(d, d, generator=g, dtype=dtype) / d**0.5 + torch.eye(d, dtype=dtype)
    X = Z @ A
    return X.T @ X / n


def ill_conditioned_hessian(d: int, seed: int = 0, cond: float = 1e8, dtype=torch.float64):
    """H = V diag(lambda) V^T with eigenvalues spread over ``cond`` decades of magnitude."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    return ((V * lam) @ V.T).to(dtype)


def weights(d_out: int, d_in: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(d_out, d_in, generator=g, dtype=dtype)
