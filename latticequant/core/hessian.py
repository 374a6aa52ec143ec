"""Hessians ``H = X^T X / n`` from streamed activations, and their damped factorisation.

docs/theory.md §1, Eq. (4): the row objective is ``(w - q)^T H (w - q) = ||X (w - q)||^2 / n``;
constant factors change no decision, so H is the mean over tokens. Damping ``lambda = damp *
mean(diag H)`` keeps the lattice basis full rank; it is raised step by step when the Cholesky
factorisation fails, and the value actually used is returned so that it can be reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from latticequant.core.triangular import all_finite

T = TypeVar("T")

MAX_DAMP = 10.0


GRAM_TILE = 384  # column tiles of at least this width when only the upper triangle is summed
GRAM_TILE_CPU = 144  # the width on the CPU, where a tile's sums are the whole product's


def gram_tiles(d: int, device: torch.device) -> int:
    """How many column tiles :func:`_add_gram_upper` cuts a ``d``-wide Gram matrix into.

    At most 4: 10 products of 16. On the CPU they may be as narrow as ``GRAM_TILE_CPU``: 4
    tiles from d = 576, SmolLM2-135M's width, where ``GRAM_TILE`` gives one tile, the whole
    square, 1.6 times the work and the time. MKL sums every element over the tokens in the
    same order whatever the tile it is computed in, so the tiles change no bit (checked from
    d = 192 to 4096, 1 to 8 tiles, 1 and 2 threads; ``test_hessian.py`` keeps checking it).
    A GPU's BLAS may split the sum differently by shape, so its tiles stay as wide as they were.
    """
    tile = GRAM_TILE_CPU if torch.device(device).type == "cpu" else GRAM_TILE
    return max(1, min(4, d // tile))


def _add_gram_upper(S: torch.Tensor, x: torch.Tensor) -> None:
    """``S += x^T x`` on the diagonal tiles and the tiles above them only.

    The Gram matrix is symmetric, so the tiles below the diagonal are never computed: with 4
    tiles (:func:`gram_tiles`) that is 10 products of 16, about a third less work, which is
    most of the calibration pass's cost after the forward itself.
    """
    d = x.shape[1]
    n_tiles = gram_tiles(d, x.device)
    edges = [i * d // n_tiles for i in range(n_tiles + 1)]
    for i in range(n_tiles):
        a = slice(edges[i], edges[i + 1])
        for j in range(i, n_tiles):
            b = slice(edges[j], edges[j + 1])
            S[a, b].addmm_(x[:, a].T, x[:, b])


@dataclass
class GramNode:
    """The Gram sum of the windows ``[start, start + size)``: one node of the summation tree.

    ``size`` is a power of two and ``start`` a multiple of it, so every node is a subtree of
    one fixed binary tree over the window indices.
    """

    start: int
    size: int
    n_tokens: int
    S: torch.Tensor  # upper triangle of sum_t x_t x_t^T over the node's windows


class HessianAccumulator:
    """Running ``sum_t x_t x_t^T`` over tokens, counted in tokens, never holding X itself.

    Each calibration window is a leaf of a fixed binary tree over the window indices, and sums
    are only ever added as that tree says (siblings into their parent; the remaining roots from
    the right), whatever the order of arrival, the batching or the split across processes. So
    the Hessian is the same float for float when the windows are shared out across ranks that
    each sum their own and exchange the partial subtrees (:meth:`nodes`, :meth:`from_nodes`):
    the reason a distributed run gives codes identical to one process. A pending subtree of
    each size is kept, at most ``log2(windows) + 1`` matrices.

    Only the upper triangle of each sum is kept up to date; :attr:`H` mirrors it, so H is
    exactly symmetric.
    """

    def __init__(
        self, d_in: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulator dtype must be float32 or float64, got {dtype}")
        self.d_in, self.dtype, self.device = d_in, dtype, torch.device(device)
        self._stack: list[GramNode] = []
        self._next_window = 0
        self._finished: tuple[torch.Tensor, int] | None = None  # (H, n_tokens) once finished

    @property
    def n_tokens(self) -> int:
        if self._finished is not None:
            return self._finished[1]
        return sum(node.n_tokens for node in self._stack)

    def _check_open(self) -> None:
        if self._finished is not None:
            raise ValueError("this Hessian is finished; it takes no more tokens")

    def add(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, first_window: int | None = None
    ) -> None:
        """Add activations ``x``: ``(windows, tokens, d_in)`` is one leaf per window, any other
        shape ``(..., d_in)`` one leaf. ``mask`` (x's shape without the last axis) keeps only
        the tokens where True. ``first_window``: the global index of x's first window (the
        next one by default); windows must arrive in increasing order."""
        self._check_open()
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have {x.shape[-1]} features, expected {self.d_in}")
        if mask is not None and mask.numel() * self.d_in != x.numel():
            raise ValueError(
                f"mask has {mask.numel()} tokens, activations {x.numel() // self.d_in}"
            )
        windows = (
            x.reshape(-1, x.shape[-2], self.d_in) if x.dim() == 3 else x.reshape(1, -1, self.d_in)
        )
        masks = None if mask is None else mask.reshape(windows.shape[:2]).to(torch.bool)
        start = self._next_window if first_window is None else int(first_window)
        if start < self._next_window:
            raise ValueError(f"window {start} arrives after window {self._next_window - 1}")
        for i in range(windows.shape[0]):
            xw = windows[i]
            if masks is not None:
                xw = xw[masks[i].to(xw.device)]
            S = torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=self.device)
            if xw.shape[0]:
                _add_gram_upper(S, xw.to(device=self.device, dtype=self.dtype))
            self._push(GramNode(start + i, 1, int(xw.shape[0]), S))
        self._next_window = start + windows.shape[0]

    def _push(self, node: GramNode) -> None:
        """Put a subtree on the stack and add up siblings, as the fixed tree says."""
        self._stack.append(node)
        while len(self._stack) >= 2:
            left, right = self._stack[-2], self._stack[-1]
            if not (
                left.size == right.size
                and left.start % (2 * left.size) == 0
                and left.start + left.size == right.start
            ):
                break
            left.S += right.S
            self._stack[-2:] = [
                GramNode(left.start, 2 * left.size, left.n_tokens + right.n_tokens, left.S)
            ]

    def nodes(self) -> list[GramNode]:
        """The pending subtrees, to be combined with other ranks' by :meth:`from_nodes`."""
        self._check_open()
        return list(self._stack)

    @classmethod
    def from_nodes(cls, parts: list[list[GramNode]], d_in: int, dtype, device="cpu"):
        """The accumulator of all windows, from the subtrees of disjoint window ranges."""
        acc = cls(d_in, dtype, device)
        nodes = sorted((n for part in parts for n in part), key=lambda n: n.start)
        for node in nodes:
            if node.start < acc._next_window:
                raise ValueError(f"window {node.start} is in two parts")
            acc._push(
                GramNode(node.start, node.size, node.n_tokens, node.S.to(device, dtype).clone())
            )
            acc._next_window = node.start + node.size
        return acc

    @property
    def sum(self) -> torch.Tensor:
        """Upper triangle of ``sum_t x_t x_t^T``: the remaining subtrees added from the right."""
        if not self._stack:
            return torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=self.device)
        total = self._stack[-1].S.clone()
        for node in reversed(self._stack[:-1]):
            total = node.S + total
        return total

    @property
    def H(self) -> torch.Tensor:
        """The mean Hessian ``X^T X / n`` in the accumulator's dtype."""
        if self._finished is not None:
            return self._finished[0]
        n = self.n_tokens
        if n == 0:
            raise ValueError("no tokens were accumulated into this Hessian")
        return mirror_upper_(self.sum).div_(n)

    def finish(self) -> torch.Tensor:
        """:attr:`H`, bit for bit, made in the memory of the pending sums: the accumulator
        then holds H instead of its sum (at Llama-3-8B's ``down_proj`` each is 822 MB, and a
        solve otherwise needs both), returns it from :attr:`H` and takes no more tokens."""
        if self._finished is None:
            n = self.n_tokens
            if n == 0:
                raise ValueError("no tokens were accumulated into this Hessian")
            total = self._stack.pop().S
            while self._stack:  # the remaining subtrees added from the right, as ``sum`` does
                total += self._stack.pop().S
            self._finished = (mirror_upper_(total).div_(n), n)
        return self._finished[0]


MIRROR_ROWS = 1024  # rows of the lower triangle written per step by mirror_upper_


def mirror_upper_(M: torch.Tensor) -> torch.Tensor:
    """Make the square ``M`` symmetric from its upper triangle, in place (the lower triangle
    is overwritten): a block of rows at a time, so no second matrix of M's size is made."""
    d = M.shape[0]
    for a in range(0, d, MIRROR_ROWS):
        b = min(a + MIRROR_ROWS, d)
        M[a:b, :a] = M[:a, a:b].T
        D = M[a:b, a:b]
        D.copy_(torch.triu(D) + torch.triu(D, 1).T)
    return M


class CrossGramAccumulator(HessianAccumulator):
    """Running ``sum_t x_t y_t^T`` of two activations of the same tokens (``C = X^T Y / n``).

    The same summation tree as :class:`HessianAccumulator` (so ranks reduce it the same way),
    but the whole matrix is summed: a cross Gram matrix is not symmetric.
    """

    def add(  # type: ignore[override]
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        first_window: int | None = None,
    ) -> None:
        """Add the token pairs of ``x`` and ``y`` (same shape, windows as in ``add``)."""
        if x.shape != y.shape or x.shape[-1] != self.d_in:
            raise ValueError(
                f"cross Gram of {tuple(x.shape)} and {tuple(y.shape)} with {self.d_in} features"
            )
        xs = x.reshape(-1, x.shape[-2], self.d_in) if x.dim() == 3 else x.reshape(1, -1, self.d_in)
        ys = y.reshape(xs.shape)
        masks = None if mask is None else mask.reshape(xs.shape[:2]).to(torch.bool)
        start = self._next_window if first_window is None else int(first_window)
        if start < self._next_window:
            raise ValueError(f"window {start} arrives after window {self._next_window - 1}")
        for i in range(xs.shape[0]):
            xw, yw = xs[i], ys[i]
            if masks is not None:
                keep = masks[i].to(xw.device)
                xw, yw = xw[keep], yw[keep]
            S = torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=self.device)
            if xw.shape[0]:
                S.addmm_(
                    xw.to(device=self.device, dtype=self.dtype).T,
                    yw.to(device=self.device, dtype=self.dtype),
                )
            self._push(GramNode(start + i, 1, int(xw.shape[0]), S))
        self._next_window = start + xs.shape[0]

    def finish(self) -> torch.Tensor:
        """:attr:`H` (a cross Gram matrix is not mirrored, so it is not made in place)."""
        return self.H

    @property
    def H(self) -> torch.Tensor:
        """The mean cross Gram ``X^T Y / n``."""
        n = self.n_tokens
        if n == 0:
            raise ValueError("no tokens were accumulated into this cross Gram matrix")
        return self.sum.div_(n)


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
        if not all_finite(t):  # a block of rows at a time: no mask of H's size
            raise ValueError(f"{name} contains NaN or Inf")


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Inputs that never fire (``H_jj = 0``): their weights cannot matter to the loss."""
    return torch.diagonal(H) == 0


def prepare_diagonal(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W and the float64 diagonal of H, with dead columns handled as the reference GPTQ does.

    A dead column gets ``H_jj = 1`` and weight 0 (in a copy of W), so it is quantized to
    exactly 0 and the basis stays full rank. Off the diagonal a dead column of ``H = X^T X`` is
    exactly zero, so H itself needs no change: a factor that reads H through a diagonal of its
    own (``permuted(H, order, diagonal=h)``) never holds a float64 copy of the whole matrix,
    1.6 GB at Llama-3-8B's ``down_proj``. Without dead columns W itself is returned: no
    quantizer writes into it, and at 4096 x 14336 a float64 copy is 470 MB.
    """
    check_inputs(W, H)
    h, dead = solve_diagonal(H)
    if dead.any():
        W = W.clone()
        W[:, dead] = 0
    return W, h


def solve_diagonal(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal a solve uses, float64 with dead columns set to 1, and those columns."""
    dead = dead_columns(H)
    h = torch.diagonal(H).to(torch.float64, copy=True)
    h[dead] = 1.0
    return h, dead


def with_damped_diagonal(
    h: torch.Tensor, damp: float, factor: Callable[[torch.Tensor], T | None]
) -> tuple[T, float]:
    """Apply ``factor`` to the damped diagonal ``h + damp * mean(h)``, raising ``damp`` until
    it succeeds.

    ``factor`` returns None when the damped matrix is not usable (a failed Cholesky). Damping
    doubles (from at least 1e-3) until it succeeds; it gives up above ``MAX_DAMP``.
    """
    d = float(damp)
    lam0 = h.mean()
    while True:
        out = factor(h + d * lam0)
        if out is not None:
            return out, d
        if d >= MAX_DAMP:
            raise ValueError(f"H is not positive definite even with damping {d:g} * mean(diag H)")
        d = max(2 * d, 1e-3)
