"""Small random weight matrices, Hessians and hand-built results shared by the tests."""

from __future__ import annotations

import torch

import latticequant as lq

BITS = (2, 3, 4, 8)  # every width the GPTQ packing stores


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


def make_result(d_out, d_in, bits, group_size=32, act_order=False, sym=False, seed=0):
    """A QuantResult built by hand: random codes, grid and (optionally shuffled) groups."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else -(-d_in // group_size)
    j = torch.arange(d_in)
    if act_order:
        perm = torch.randperm(d_in, generator=g)
        g_idx = torch.empty(d_in, dtype=torch.long)
        g_idx[perm] = j // (d_in if group_size == -1 else group_size)
    else:
        g_idx = j // (d_in if group_size == -1 else group_size)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (d_out, d_in), generator=g)
    scales = torch.rand(d_out, n_groups, generator=g, dtype=torch.float64) * 0.05 + 1e-3
    if sym:
        zeros = torch.full((d_out, n_groups), float(1 << (bits - 1)), dtype=torch.float64)
    else:
        zeros = torch.randint(1, maxq + 1, (d_out, n_groups), generator=g).double()
    Q = scales[:, g_idx] * (codes - zeros[:, g_idx])
    return lq.QuantResult(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        Q=Q,
        order=j,
        loss=torch.zeros(d_out),
        bound=torch.zeros(d_out),
        clipped=0,
        overflow=0,
        damp=0.01,
        D=torch.ones(d_in),
        bits=bits,
    )


def bit_fields(words, n: int, bits: int) -> list[int]:
    """The ``n`` fields of ``bits`` bits in one packed line of int32 words, read from the
    little-endian bit stream as one big integer: an independent reader of the GPTQ layout."""
    stream = sum((int(w) % (1 << 32)) << (32 * i) for i, w in enumerate(words))
    return [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(n)]
