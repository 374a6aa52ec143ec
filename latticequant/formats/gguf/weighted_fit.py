"""Block scales chosen from the Hessian-weighted error where llama.cpp's own fit ignores it.

llama.cpp fits every type's block scales by a search weighted by the importance matrix (the
diagonal of the layer's Hessian, :func:`~latticequant.formats.gguf.reference.fit_grid`), except
``Q2_0``: ``quantize_row_q2_0_ref`` sets ``d = max |x|`` and rounds, so its levels
``{-1, 0, 1, 2} d`` put the code ``2`` beyond every weight and the block is ternary in
``{-amax, 0, amax}``. Its ``d`` is an ordinary float16, of either sign, that
``dequantize_row_q2_0`` and the ``Q2_0 x Q8_0`` dot product only multiply, so a negative ``d``
gives the mirrored levels ``{-2, -1, 0, 1} |d|``. :func:`fit_q2_0` chooses, block by block, the
``d`` (both signs, a grid of magnitudes, then a weighted least-squares step) that minimises the
diagonal-weighted error ``sum_j h_jj (x_j - z_j d)^2`` of nearest rounding: the static grid the
decoders then decode on, as for every other type (the diagonal of the row objective
``(w - q)^T H (w - q)``, docs/theory.md §1, Eq. (4)).
"""

from __future__ import annotations

import numpy as np

from latticequant.formats.gguf.reference import check_importance
from latticequant.formats.gguf.types import GGMLType, GgufGrid, type_info

__all__ = ["Q2_0_STEPS", "fit_q2_0", "q2_0_error"]

#: Magnitudes tried for ``|d|``, in units of the block's ``max |x|``, up to llama.cpp's
#: ``d = max |x|`` (``1.0``); down to ``0.02``, where a block gives up an outlier its weights make
#: cheap. Geometric steps of 6%: on random blocks the fit came within 0.3% of the best float16
#: ``d`` found by trying every one (``tests/formats/test_gguf_weighted_fit.py`` holds it to 1%).
Q2_0_STEPS = np.geomspace(0.02, 1.0, 64)

#: Blocks per step, bounding the ``(blocks, candidates, 64)`` temporaries.
CHUNK = 1024


def _fp16(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).astype(np.float32)


def _codes(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest level of ``{-1, 0, 1, 2} d`` for every weight: codes ``z - 1`` in ``-1 .. 2``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(d != 0, x / np.where(d != 0, d, 1), 0)
    return np.clip(np.rint(u), -1, 2)


def q2_0_error(x: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Weighted error ``sum_j w_j (x_j - z_j d)^2`` of nearest rounding on the scale ``d``
    (broadcast against ``x``'s leading axes; the last axis is the block)."""
    d = d[..., None]
    e = x - _codes(x, d) * d
    return (w * e * e).sum(axis=-1)


def _fit_blocks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float16 ``d`` per block for blocks ``x`` (n, 64) with weights ``w`` (n, 64)."""
    amax = np.abs(x).max(axis=1)
    sign = np.array([1.0, -1.0], dtype=np.float32)
    cand = _fp16(amax[:, None, None] * sign[None, :, None] * Q2_0_STEPS[None, None, :])
    cand = cand.reshape(len(x), -1)  # (n, 2 * steps)
    err = q2_0_error(x[:, None, :], w[:, None, :], cand)
    pick = err.argmin(axis=1)
    best, best_err = cand[np.arange(len(x)), pick], err[np.arange(len(x)), pick]
    # one weighted least-squares step on the best grid's codes: d = sum w x z / sum w z^2
    z = _codes(x, best[:, None])
    den = (w * z * z).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = _fp16(np.where(den > 0, (w * x * z).sum(axis=1) / np.where(den > 0, den, 1), best))
    keep = q2_0_error(x, w, ls) < best_err
    return np.where(keep, ls, best).astype(np.float16)


def fit_q2_0(W, importance=None) -> GgufGrid:
    """The ``Q2_0`` grid of ``W`` (rows x cols, cols a multiple of 64) whose block scales
    minimise the error weighted by ``importance`` (the Hessian's diagonal, one weight per
    column; uniform when None). Never worse in that error than llama.cpp's ``d = max |x|``,
    which is one of the candidates."""
    x = np.asarray(W, dtype=np.float32)
    g = type_info(GGMLType.Q2_0).block_size
    rows, cols = x.shape
    if cols % g:
        raise ValueError(f"Q2_0 needs rows a multiple of {g} long, got {cols}")
    nb = cols // g
    if importance is None:
        h = np.ones(cols, dtype=np.float32)
    else:
        h = check_importance(importance, cols)
        # a column the calibration never excited still counts a little, as its weight does
        h = h + np.float32(1e-6) * max(float(h.mean()), 1e-30)
    blocks = x.reshape(-1, g)
    weights = np.broadcast_to(h.reshape(1, nb, g), (rows, nb, g)).reshape(-1, g)
    d = np.empty(len(blocks), dtype=np.float16)
    for a in range(0, len(blocks), CHUNK):
        d[a : a + CHUNK] = _fit_blocks(blocks[a : a + CHUNK], weights[a : a + CHUNK])
    return GgufGrid(GGMLType.Q2_0, (rows, cols), d=d.reshape(rows, nb))
