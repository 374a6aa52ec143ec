"""The GGUF grids under a decoder with error feedback: GPTQ (Babai's nearest plane) on
llama.cpp's fixed grid, one column at a time through :class:`ColumnRounder`; its codes pack
into bytes that gguf-py reads back as exactly the weights the decoder chose."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from latticequant.formats.gguf import (
    TYPES,
    ColumnRounder,
    GGMLType,
    dequantize,
    fit_grid,
    nearest_codes,
    pack,
)


def problem(t: GGMLType, rows: int = 8, seed: int = 0):
    """W and a Hessian ``H = X^T X`` of correlated inputs, over two blocks of columns."""
    rng = np.random.default_rng(seed)
    cols = 2 * TYPES[t].block_size if TYPES[t].block_size < 256 else 256
    W = rng.standard_normal((rows, cols)) * 0.05
    mix = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
    X = rng.standard_normal((2 * cols, cols)) @ mix * rng.uniform(0.2, 2, cols)
    return W.astype(np.float32).astype(np.float64), X.T @ X


def gptq_on_grid(W: np.ndarray, H: np.ndarray, rounder: ColumnRounder):
    """GPTQ in its plain form: round column j, spread its error over the later columns with the
    row ``U[j, j:]`` of the upper Cholesky factor of ``H^-1`` (float64)."""
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    W = W.copy()
    Z = np.zeros(W.shape, dtype=np.int64)
    Q = np.zeros(W.shape)
    for j in range(W.shape[1]):
        Z[:, j], Q[:, j] = rounder(W[:, j], j)
        e = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1 :] -= np.outer(e, U[j, j + 1 :])
    return Z, Q


def loss(W, Q, H):
    E = W - Q
    return float(np.einsum("ij,jk,ik->", E, H, E))


@pytest.mark.parametrize("t", list(TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
def test_gptq_on_gguf_grid(t, weighted):
    W, H = problem(t)
    importance = np.diag(H) / len(H) if weighted else None
    grid = fit_grid(t, W, importance)
    Z, Q = gptq_on_grid(W, H, ColumnRounder(grid))
    assert Z.min() >= 0 and Z.max() <= TYPES[t].maxq
    np.testing.assert_array_equal(dequantize(Z, grid).astype(np.float64), Q)
    rtn = dequantize(nearest_codes(W, grid), grid).astype(np.float64)
    assert loss(W, Q, H) < 0.9 * loss(W, rtn, H)
    gguf_type = getattr(gguf.GGMLQuantizationType, t.name, None)
    if gguf_type is not None:
        read = gguf.quants.dequantize(pack(Z, grid), gguf_type)
        np.testing.assert_array_equal(read.astype(np.float64), Q)


def test_column_rounder_is_nearest_codes():
    """Column by column without feedback, the rounder is :func:`nearest_codes`."""
    for t in TYPES:
        W, _ = problem(t, rows=4, seed=1)
        grid = fit_grid(t, W)
        rounder = ColumnRounder(grid)
        Z = np.stack([rounder(W[:, j], j)[0] for j in range(W.shape[1])], axis=1)
        np.testing.assert_array_equal(Z, nearest_codes(W, grid))
    with pytest.raises(IndexError):
        rounder(W[:, 0], W.shape[1])
