"""Randomised Hadamard rotations of a layer's input space (incoherence processing).

An orthogonal ``R`` (d_in x d_in) changes nothing a layer computes, ``x W^T = (x R)(W R)^T``,
but it changes the closest-vector problem the quantizer solves: the target moves to ``W' = W R``
and the lattice's Gram matrix to ``H' = R^T H R`` (docs/theory.md §1, Eq. (4) with ``X`` replaced
by ``X R``). A random-signed Hadamard ``R`` spreads every weight row and every direction of H
over all coordinates, so outlier weights and the few input channels that dominate H no longer
sit on single coordinates of the grid: clipping nearly vanishes and rounding errors of every
coordinate cost about the same.

``R = diag(s) (H_a (x) F) / sqrt(a)``: random signs ``s``, a Sylvester Hadamard matrix of the
largest power of two ``a`` that divides d_in, and a small orthogonal factor ``F`` of the odd
part ``m = d_in / a`` (the identity when ``m = 1``; a random orthogonal matrix otherwise, so that
576 = 64 x 9 or 1536 = 512 x 3 need no Hadamard matrix of an order that has none). Applying it
costs ``log2(a)`` butterfly passes and one ``m x m`` product per row: a fast Walsh-Hadamard
transform, never the dense ``d_in x d_in`` matrix.

The same class holds the transpose layout ``R = diag(s) (F (x) H_a) / sqrt(a)``
(``factor_major``): with ``F = I`` it is the block-diagonal Hadamard ``I_m (x) H_a / sqrt(a)``
that compressed-tensors' ``hadamard`` transform builds (:func:`block_hadamard_rotation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = [
    "MAX_ODD_FACTOR",
    "Rotation",
    "hadamard_rotation",
    "block_hadamard_rotation",
    "split_size",
    "fwht",
    "sylvester_hadamard",
    "rotate_problem",
]

MAX_ODD_FACTOR = 63
"""The largest odd part of d_in the stored factor may take (63 x 63 float64: 31 KiB)."""


def split_size(n: int) -> tuple[int, int]:
    """``(a, m)`` with ``n = a * m``, ``a`` the largest power of two dividing n.

    Raises ``ValueError`` when the odd part is above :data:`MAX_ODD_FACTOR` (its stored factor
    would no longer be small) or n is not positive.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"a Hadamard rotation needs a positive size, got {n!r}")
    a = n & -n
    m = n // a
    if m > MAX_ODD_FACTOR:
        raise ValueError(
            f"size {n} = {a} x {m} has an odd factor {m} above {MAX_ODD_FACTOR}, which the "
            "Hadamard rotation does not take; skip the layer (--skip) or drop --rotate"
        )
    return a, m


def sylvester_hadamard(a: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix of order ``a`` (a power of two):
    ``H[i, j] = (-1)^popcount(i & j)``, symmetric, ``H H = a I``."""
    if a <= 0 or a & (a - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, got {a}")
    i = torch.arange(a)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def fwht(x: torch.Tensor, a: int) -> torch.Tensor:
    """``H_a`` applied along axis -2 of ``x`` (shape ``(..., a, m)``), unnormalised.

    ``log2(a)`` butterfly passes, each pairing the index ``j`` with ``j + h``: the fast
    Walsh-Hadamard transform.
    """
    if x.shape[-2] != a:
        raise ValueError(f"fwht over {a} rows got an axis of {x.shape[-2]}")
    lead, m = x.shape[:-2], x.shape[-1]
    h = 1
    while h < a:
        y = x.reshape(*lead, a // (2 * h), 2, h, m)
        u, v = y[..., 0, :, :], y[..., 1, :, :]
        x = torch.stack((u + v, u - v), dim=-3).reshape(*lead, a, m)
        h *= 2
    return x


#: a Walsh-Hadamard transform ``(y, a) -> y (H_a (x) I)`` on ``y``'s second-last axis of size ``a``
Butterfly = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Rotation:
    """The orthogonal ``R = diag(signs) (H_a (x) factor) / sqrt(a)`` of one layer's input space.

    signs: ``(n,)`` of +-1. factor: ``(m, m)`` orthogonal, float64. ``n = a * m``.
    factor_major: ``R = diag(signs) (factor (x) H_a) / sqrt(a)`` instead (index ``j = j_m * a +
    j_a``, ``H_a`` on the low index): compressed-tensors' layout, block-diagonal for an identity
    factor.
    """

    signs: torch.Tensor
    factor: torch.Tensor
    factor_major: bool = False

    def __post_init__(self) -> None:
        n = self.signs.numel()
        m = self.factor.shape[0] if self.factor.dim() == 2 else -1
        if self.signs.dim() != 1 or self.factor.dim() != 2 or self.factor.shape != (m, m):
            raise ValueError("a rotation needs 1-D signs and a square factor")
        if m <= 0 or n % m or (n // m) & (n // m - 1):
            raise ValueError(f"signs of length {n} do not split as a power of two times {m}")

    @cached_property
    def plain_factor(self) -> bool:
        """Whether ``factor`` is the identity (block-diagonal Hadamard): its product is skipped."""
        return bool(torch.equal(self.factor, torch.eye(self.m, dtype=self.factor.dtype)))

    @property
    def n(self) -> int:
        return self.signs.numel()

    @property
    def m(self) -> int:
        return self.factor.shape[0]

    @property
    def a(self) -> int:
        return self.n // self.m

    def apply(self, x: torch.Tensor, butterfly: Butterfly | None = None) -> torch.Tensor:
        """``x R`` over the last axis of ``x``, in x's dtype. ``butterfly(y, a)``: the
        Walsh-Hadamard transform of ``y``'s second-last axis (:func:`fwht` unless given, e.g. a
        GPU kernel of the same)."""
        self._check(x)
        return self._kron(x * self.signs.to(x.dtype), self.factor, butterfly or fwht)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``x R^T`` over the last axis (``R^T`` undoes :meth:`apply`)."""
        return self._kron(x, self.factor.T, fwht) * self.signs.to(x.dtype)

    def _kron(self, x: torch.Tensor, factor: torch.Tensor, butterfly: Butterfly) -> torch.Tensor:
        """``x (H_a (x) factor) / sqrt(a)``: index ``j = j_a * m + j_m``; ``H_a`` acts on j_a.
        Factor-major: ``x (factor (x) H_a) / sqrt(a)``, the same on ``X^T`` for ``X`` the
        ``(m, a)`` view of x (``H_a`` is symmetric)."""
        self._check(x)
        lead = x.shape[:-1]
        if self.factor_major:
            y = x.reshape(*lead, self.m, self.a).transpose(-1, -2)
        else:
            y = x.reshape(*lead, self.a, self.m)
        y = butterfly(y, self.a)
        if self.m > 1 and not self.plain_factor:
            y = y @ factor.to(x.dtype)
        if self.factor_major:
            y = y.transpose(-1, -2)
        return (y * (1.0 / math.sqrt(self.a))).reshape(*lead, self.n)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to {x.shape[-1]} features")

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``R`` (for tests and small layers): :meth:`apply` of the identity."""
        return self.apply(torch.eye(self.n, dtype=dtype))


def _random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``m x m`` matrix: QR of a Gaussian, columns' signs fixed."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    G = torch.randn(m, m, generator=generator, dtype=torch.float64)
    Q, Rr = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diagonal(Rr))[None, :]).contiguous()


def hadamard_rotation(n: int, seed: int) -> Rotation:
    """The randomised Hadamard rotation of size ``n`` drawn from ``seed`` (CPU generator)."""
    _, m = split_size(n)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the rotation seed must be a non-negative integer, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=generator)
    signs = (1 - 2 * bits).to(torch.float64)
    return Rotation(signs, _random_orthogonal(m, generator))


def block_hadamard_rotation(n: int, block: int) -> Rotation:
    """``I_{n / block} (x) H_block / sqrt(block)``: a Sylvester Hadamard on each run of ``block``
    consecutive inputs, no signs. It is what compressed-tensors' ``hadamard`` transform applies
    (``deterministic_hadamard_matrix(block)``, block-diagonal when the scheme's ``head_dim`` is
    below n), built here without it."""
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block & (block - 1):
        raise ValueError(f"a Sylvester block has a power-of-two order, got {block!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n % block:
        raise ValueError(f"{n} inputs do not split into blocks of {block}")
    m = n // block
    signs = torch.ones(n, dtype=torch.float64)
    return Rotation(signs, torch.eye(m, dtype=torch.float64), factor_major=True)


#: Rows of H rotated per step, and the tile of the in-place transpose and symmetrisation: the
#: rotated Hessian is built in one float64 buffer, whatever the width.
ROTATE_ROWS = 256


def rotate_problem(
    W: torch.Tensor, H: torch.Tensor, rotation: Rotation
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W R, R^T H R)``: the same layer and objective in the rotated input basis.

    ``R^T H R`` is float64 and the only ``n x n`` matrix made: ``N = H R`` a block of rows at a
    time, transposed in place (``N^T = R^T H``), rotated again by rows (``R^T H R``'s
    transpose) and symmetrised in place, so that its factorisation sees an exactly symmetric
    matrix. H itself (float32 as accumulated, or float64) is only read.
    """
    W_rot = rotation.apply(W)
    n = H.shape[0]
    M = torch.empty(n, n, dtype=torch.float64, device=H.device)
    for a in range(0, n, ROTATE_ROWS):
        M[a : a + ROTATE_ROWS] = rotation.apply(H[a : a + ROTATE_ROWS].to(torch.float64))
    _transpose_(M)
    for a in range(0, n, ROTATE_ROWS):
        M[a : a + ROTATE_ROWS] = rotation.apply(M[a : a + ROTATE_ROWS])
    return W_rot, _symmetrize_(M)


def _tiles(n: int) -> list[slice]:
    return [slice(a, min(a + ROTATE_ROWS, n)) for a in range(0, n, ROTATE_ROWS)]


def _transpose_(M: torch.Tensor) -> torch.Tensor:
    """``M <- M^T`` in place for a square M, one pair of tiles at a time."""
    tiles = _tiles(M.shape[0])
    for i, ti in enumerate(tiles):
        M[ti, ti] = M[ti, ti].T.clone()
        for tj in tiles[i + 1 :]:
            upper = M[ti, tj].clone()
            M[ti, tj] = M[tj, ti].T
            M[tj, ti] = upper.T
    return M


def _symmetrize_(M: torch.Tensor) -> torch.Tensor:
    """``M <- (M + M^T) / 2`` in place, one pair of tiles at a time."""
    tiles = _tiles(M.shape[0])
    for i, ti in enumerate(tiles):
        M[ti, ti] = (M[ti, ti] + M[ti, ti].T) * 0.5
        for tj in tiles[i + 1 :]:
            mean = (M[ti, tj] + M[tj, ti].T) * 0.5
            M[ti, tj] = mean
            M[tj, ti] = mean.T
    return M
