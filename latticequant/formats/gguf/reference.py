"""llama.cpp's own choice of each block's scales, and its round-to-nearest codes.

A port of ggml-quants.c's quantizers. Without an importance matrix, the ones ``llama-quantize``
runs then: ``quantize_row_{q8_0,q5_0,q5_1,q4_0,q4_1,q2_0}_ref``,
``quantize_row_{q6_K,q5_K,q4_K,q3_K,q2_K}_ref`` (with their helpers ``make_qx_quants``,
``make_q3_quants``, ``make_qkx2_quants``) and ``quantize_iq4_nl`` (``quantize_row_iq4_nl_impl``
with ``ntry = 7``). With one (one weight per input column, the Hessian's diagonal), the
``quantize_row_*_impl`` fits that weight each error by it (``make_qx_quants`` with weights,
``make_qkx3_quants``, ``make_qp_quants`` for the super-block scales).

Every block of every row is handled at once: the C loops over the weights of a block become
operations on arrays of blocks, in float32 and in the C order of operations (sums accumulated
weight by weight, ``nearest_int`` rounding half to even), so that the bytes equal ggml's.

:func:`quantize_reference` returns the grid (the stored ``d``, ``dmin``, ``sc``, ``m``) and the
codes llama.cpp writes; :func:`fit_grid` only the grid, the static grid on which a decoder with
error feedback then chooses its own codes.
"""

from __future__ import annotations

import numpy as np

from latticequant.formats.gguf.types import (
    KVALUES_IQ4NL,
    QK_K,
    GGMLType,
    GgufGrid,
    as_type,
    type_info,
)
from latticequant.formats.packing import FormatError

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: float32 rounded half to even, as int64 (non-finite values give 0;
    they occur only where the C code never looks)."""
    x = np.where(np.isfinite(x), x, 0)
    return np.rint(x).astype(np.int64)


def _fp16(x: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16``: float32 rounded to the nearest float16 (ties to even)."""
    return np.asarray(x, dtype=F32).astype(np.float16)


def _absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``amax = max |x|`` and ``max``, the first weight reaching it (signed), per block."""
    i = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, i[:, None], axis=1)[:, 0]
    return np.abs(mx), mx


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's ``roundf``: half away from zero."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


def seq_sum(x: np.ndarray) -> np.ndarray:
    """``sum x`` along each row in float32, added in order from 0 as the C loops do
    (``add.accumulate`` is sequential, unlike ``sum``'s pairwise summation)."""
    return F32(0) + np.add.accumulate(x, axis=1, dtype=F32)[:, -1]


def sum_sq(x: np.ndarray) -> np.ndarray:
    """``sum x^2`` along each row, as :func:`seq_sum`."""
    return seq_sum(x * x)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / b


# ---------------------------------------------------------------- the block-32 (and 64) types


def _q8_0(x):
    amax = np.abs(x).max(axis=1)
    d = amax / F32(127)
    id_ = np.where(d != 0, _safe_div(F32(1), d), F32(0)).astype(F32)
    q = _roundf(x * id_[:, None])
    return q.astype(np.int64) + 128, {"d": _fp16(d)}


def _qx_0(x, nmax, qw=None, sigma2=None):
    """Q4_0 (``nmax = 8``) and Q5_0 (``nmax = 16``): ``d = max / -nmax``; with an importance
    matrix ``quantize_row_q{4,5}_0_impl``: the weighted least-squares ``make_qx_quants``."""
    if qw is not None:
        d, L = make_qx_quants(x, nmax, 1, _importance(qw, x, sigma2))
        return L, {"d": _fp16(d)}
    _, mx = _absmax(x)
    d = mx / F32(-nmax)
    id_ = np.where(d != 0, _safe_div(F32(1), d), F32(0)).astype(F32)
    q = np.trunc(x * id_[:, None] + F32(nmax + 0.5)).astype(np.int64)
    return np.minimum(2 * nmax - 1, q), {"d": _fp16(d)}


def _qx_1(x, maxq, qw=None, sigma2=None):
    """Q4_1 (``maxq = 15``) and Q5_1 (``maxq = 31``): ``d = (max - min) / maxq``, ``m = min``;
    with an importance matrix ``quantize_row_q{4,5}_1_impl`` (``make_qkx3_quants``)."""
    if qw is not None:
        w = _importance(qw, x, sigma2)
        d, the_min, L = make_qkx2_quants(x, w, maxq, -0.9, 0.05, 36, False)
        return L, {"d": _fp16(d), "m": _fp16(-the_min)}
    mn, mx = x.min(axis=1), x.max(axis=1)
    d = (mx - mn) / F32(maxq)
    id_ = np.where(d != 0, _safe_div(F32(1), d), F32(0)).astype(F32)
    q = np.trunc((x - mn[:, None]) * id_[:, None] + F32(0.5)).astype(np.int64)
    return np.minimum(maxq, q), {"d": _fp16(d), "m": _fp16(mn)}


def _q2_0(x):
    d = np.abs(x).max(axis=1)
    id_ = np.where(d > 0, _safe_div(F32(1), d), F32(0)).astype(F32)
    q = _roundf(x * id_[:, None]).astype(np.int64) + 1
    return np.clip(q, 0, 3), {"d": _fp16(d)}


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's ``best_index_int8``: the index of the nearest of the sorted ``values`` (the upper
    one on a tie)."""
    v = values.astype(F32)
    mu = np.clip(np.searchsorted(v, x, side="right"), 1, len(v) - 1)
    lower = (x - v[mu - 1]) < (v[mu] - x)
    return np.where(lower, mu - 1, mu).astype(np.int64)


def _iq4_nl(x, qw=None, ntry=7):
    """``quantize_row_iq4_nl_impl`` on one 32-weight block per row of ``x`` (weights ``x^2``, or
    ``qw sqrt(sigma2 + x^2)`` with an importance matrix)."""
    values = KVALUES_IQ4NL
    v0 = F32(values[0])
    n = x.shape[1]
    if qw is None:
        w = x * x
    else:
        w = _importance(qw, x, sum_sq(x) * (F32(2) / F32(n)))
    amax, mx = _absmax(x)
    zero = amax < GROUP_MAX_EPS

    def sums(id_):
        q = values[best_index_int8(values, id_[:, None] * x)].astype(F32)
        return seq_sum(w * q * x), seq_sum(w * q * q)

    with np.errstate(divide="ignore", invalid="ignore"):
        d = (-mx / v0) if ntry > 0 else (mx / v0)
        sumqx, sumq2 = sums(F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F32(itry + int(values[0])) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(F32)
            best = np.where(better, d * sumqx, best).astype(F32)
        d = np.where(zero, F32(0), d).astype(F32)
        id_ = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    return best_index_int8(values, id_[:, None] * x), {"d": _fp16(d)}


# ---------------------------------------------------------------- helpers of the K types


def make_qx_quants(x, nmax, rmse_type=1, qw=None):
    """``make_qx_quants(n, nmax, x, L, rmse_type, qw)`` on each row of ``x``: (scale, L); the
    weights are ``qw`` when given, else ``x^2`` (``rmse_type`` 1) or 1."""
    N, n = x.shape
    amax, mx = _absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = qw if qw is not None else x * x if rmse_type == 1 else np.ones_like(x)

    def quants(iscale):
        return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(lv):
        lf = lv.astype(F32)
        return seq_sum(w * x * lf), seq_sum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-nmax) / mx
        lv = quants(iscale)
        L = lv + nmax
        sumlx, suml2 = sums(lv)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for is_ in range(-9, 10):
            if is_ == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(is_)) / mx
            lv = quants(iscale)
            sumlx, suml2 = sums(lv)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], lv + nmax, L)
            scale = np.where(better, sumlx / suml2, scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)


def make_q3_quants(x, nmax):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on each row of ``x``: (scale, L)."""
    N, n = x.shape
    amax, mx = _absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-nmax) / mx
        L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = L.astype(F32)
        sumlx, suml2 = seq_sum(w * x * lf), seq_sum(w * lf * lf)
        active = ~zero
        for _ in range(5):
            n_changed = np.zeros(N, dtype=np.int64)
            for i in range(n):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                changed = active & (slx > 0) & (new_l != L[:, i])
                nl = new_l.astype(F32)
                slx = slx + wi * xi * nl
                sl2 = sl2 + wi * nl * nl
                accept = changed & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[:, i] = np.where(accept, new_l, L[:, i])
                sumlx = np.where(accept, slx, sumlx).astype(F32)
                suml2 = np.where(accept, sl2, suml2).astype(F32)
                n_changed += accept
            active &= n_changed > 0
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L + nmax)


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants`` on each row of ``x``: (scale, the_min, L), ``x = scale L - the_min``."""
    N, n = x.shape
    mn, mx = x.min(axis=1), x.max(axis=1)
    sum_w = np.add.accumulate(weights, axis=1, dtype=F32)[:, -1]  # from weights[0], as in C
    sum_x = np.add.accumulate(weights * x, axis=1, dtype=F32)[:, -1]
    mn = np.minimum(mn, F32(0))
    flat = mx == mn

    def error(scale, lv, the_min):
        diff = scale[:, None] * lv.astype(F32) + the_min[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return seq_sum(weights * diff)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        best_error = error(scale, L, mn)
        for is_ in range(nstep + 1):
            # min is the best one so far: later steps measure from it, as the C loop does
            iscale = (F32(rmin) + F32(rdelta) * F32(is_) + F32(nmax)) / (mx - mn)
            lv = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = lv.astype(F32)
            wl = weights * lf
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * lf), seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min).astype(F32)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(F32)
            cur_error = error(this_scale, lv, this_min)
            better = (D > 0) & (cur_error < best_error)
            L = np.where(better[:, None], lv, L)
            best_error = np.where(better, cur_error, best_error).astype(F32)
            scale = np.where(better, this_scale, scale).astype(F32)
            mn = np.where(better, this_min, mn).astype(F32)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat[:, None], 0, L)
    return scale, -mn, L


def make_qp_quants(x, nmax, qw):
    """``make_qp_quants(n, nmax, x, L, qw)`` on each row of ``x`` (non-negative): (scale, L),
    ``L`` in ``0 .. nmax``; the super-block scale of the sub-block scales with an importance
    matrix."""
    N, n = x.shape
    mx = np.maximum(x.max(axis=1), F32(0))
    zero = mx < GROUP_MAX_EPS

    def mse(scale, lv):
        diff = x - scale[:, None] * lv.astype(F32)
        return seq_sum(qw * diff * diff)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(nmax) / mx
        best_mse = mse(F32(1) / iscale, nearest_int(iscale[:, None] * x))
        for is_ in range(-4, 5):
            if is_ == 0:
                continue
            iscale_is = (F32(0.1) * F32(is_) + F32(nmax)) / mx
            err = mse(F32(1) / iscale_is, np.minimum(nmax, nearest_int(iscale_is[:, None] * x)))
            better = err < best_mse
            best_mse = np.where(better, err, best_mse).astype(F32)
            iscale = np.where(better, iscale_is, iscale).astype(F32)
        L = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        lf = L.astype(F32)
        sumlx, suml2 = seq_sum(qw * x * lf), seq_sum(qw * lf * lf)
        active = ~zero
        for _ in range(5):
            n_changed = np.zeros(N, dtype=np.int64)
            for i in range(n):
                wi, xi, li = qw[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                changed = active & (slx > 0) & (sl2 > 0) & (new_l != L[:, i])
                nl = new_l.astype(F32)
                slx = slx + wi * xi * nl
                sl2 = sl2 + wi * nl * nl
                accept = changed & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[:, i] = np.where(accept, new_l, L[:, i])
                sumlx = np.where(accept, slx, sumlx).astype(F32)
                suml2 = np.where(accept, sl2, suml2).astype(F32)
                n_changed += accept
            active &= n_changed > 0
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)


def _importance(qw, x, sigma2):
    """``qw * sqrtf(sigma2 + x^2)``: the weights of a weight given its importance ``qw``."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _requant(x, dl, dm, lo, hi, L):
    """The final pass of the K types: ``l = nearest_int((x + dm) / dl)`` clipped to ``lo..hi``
    in every sub-block whose ``dl`` is not 0 (the others keep the first pass's ``L``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.clip(nearest_int((x + dm[..., None]) / dl[..., None]), lo, hi)
    return np.where((dl != 0)[..., None], lv - lo, L)


def _sub(x, g):
    """Blocks ``(N, 256)`` as sub-blocks ``(N * 256 / g, g)``."""
    return x.reshape(-1, g)


# ---------------------------------------------------------------- the K types


def _q2_K(x, qw=None):
    N = x.shape[0]
    xs = _sub(x, 16)
    if qw is not None:  # quantize_row_q2_K_impl
        sigma2 = np.repeat(sum_sq(x) / F32(QK_K), 16)
        w = _importance(_sub(qw, 16), xs, sigma2)
        scales, mins, L = make_qkx2_quants(xs, w, 3, -0.9, 0.05, 36, False)
        sw = seq_sum(w).reshape(N, 16)
        dm, ls = make_qp_quants(scales.reshape(N, 16), 15, sw)
        mm, lm = make_qp_quants(mins.reshape(N, 16), 15, sw)
        byte = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.int16)
        d, dmin = _fp16(dm), _fp16(mm)
        sc, m = byte & 0xF, byte >> 4
        dl = d.astype(F32)[:, None] * sc.astype(F32)
        dmf = dmin.astype(F32)[:, None] * m.astype(F32)
        L = _requant(x.reshape(N, 16, 16), dl, dmf, 0, 3, L.reshape(N, 16, 16))
        return L.reshape(N, QK_K), {"d": d, "dmin": dmin, "sc": sc, "m": m}
    scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(N, 16), mins.reshape(N, 16), L.reshape(N, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = nearest_int((F32(15) / max_scale)[:, None] * scales)
        lm = nearest_int((F32(15) / max_min)[:, None] * mins)
    ls = np.where((max_scale > 0)[:, None], ls, 0)
    lm = np.where((max_min > 0)[:, None], lm, 0)
    byte = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.int16)
    sc, m = byte & 0xF, byte >> 4
    d = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    dm = dmin.astype(F32)[:, None] * m.astype(F32)
    L = _requant(x.reshape(N, 16, 16), dl, dm, 0, 3, L)
    return L.reshape(N, QK_K), {"d": d, "dmin": dmin, "sc": sc, "m": m}


def _q3_K(x, qw=None):
    N = x.shape[0]
    if qw is not None:  # quantize_row_q3_K_impl
        xs = _sub(x, 16)
        sigma2 = np.repeat(F32(2) * sum_sq(x) / F32(QK_K), 16)
        w = _importance(_sub(qw, 16), xs, sigma2)
        scales, L = make_qx_quants(xs, 4, 1, w)
        d_block, ls = make_qx_quants(scales.reshape(N, 16), 32, 1, seq_sum(w).reshape(N, 16))
        d, sc = _fp16(d_block), (ls - 32).astype(np.int16)
        dl = d.astype(F32)[:, None] * sc.astype(F32)
        L = _requant(x.reshape(N, 16, 16), dl, np.zeros_like(dl), -4, 3, L.reshape(N, 16, 16))
        return L.reshape(N, QK_K), {"d": d, "sc": sc}
    scales, L = make_q3_quants(_sub(x, 16), 4)
    scales, L = scales.reshape(N, 16), L.reshape(N, 16, 16)
    i = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, i[:, None], axis=1)[:, 0]
    nonzero = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / max_scale
        l8 = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l
        d = _fp16(np.where(nonzero, F32(1) / iscale, F32(0)))
    sc = np.where(nonzero[:, None], np.clip(l8, -32, 31), -32).astype(np.int16)
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    L = _requant(x.reshape(N, 16, 16), dl, np.zeros_like(dl), -4, 3, L)
    return L.reshape(N, QK_K), {"d": d, "sc": sc}


def _qx_K(x, nmax, rmin, rdelta, nstep, qw=None):
    """Q4_K (``nmax = 15``) and Q5_K (``nmax = 31``): 8 sub-blocks of 32, 6-bit ``sc`` and ``m``;
    with an importance matrix ``quantize_row_q{4,5}_K_impl``."""
    N = x.shape[0]
    xs = _sub(x, 32)
    if qw is not None:
        sigma2 = np.repeat(F32(2) * sum_sq(x) / F32(QK_K), 8)
        w = _importance(_sub(qw, 32), xs, sigma2)
        scales, mins, L = make_qkx2_quants(xs, w, nmax, -0.9, 0.05, 36, False)
        sw = seq_sum(w).reshape(N, 8)
        d_block, ls = make_qp_quants(scales.reshape(N, 8), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(N, 8), 63, sw)
        sc = np.minimum(63, ls & 0xFF).astype(np.int16)
        m = np.minimum(63, lm & 0xFF).astype(np.int16)
        d, dmin = _fp16(d_block), _fp16(m_block)
        dl = d.astype(F32)[:, None] * sc.astype(F32)
        dm = dmin.astype(F32)[:, None] * m.astype(F32)
        L = _requant(x.reshape(N, 8, 32), dl, dm, 0, nmax, L.reshape(N, 8, 32))
        return L.reshape(N, QK_K), {"d": d, "dmin": dmin, "sc": sc, "m": m}
    av_x = np.sqrt(sum_sq(xs) / F32(32))
    weights = av_x[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2_quants(xs, weights, nmax, rmin, rdelta, nstep, False)
    scales, mins, L = scales.reshape(N, 8), mins.reshape(N, 8), L.reshape(N, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    sc = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.int16)
    m = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.int16)
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    dm = dmin.astype(F32)[:, None] * m.astype(F32)
    L = _requant(x.reshape(N, 8, 32), dl, dm, 0, nmax, L)
    return L.reshape(N, QK_K), {"d": d, "dmin": dmin, "sc": sc, "m": m}


def _q6_K(x, qw=None):
    N = x.shape[0]
    scales, L = make_qx_quants(_sub(x, 16), 32, 1, None if qw is None else _sub(qw, 16))
    scales, L = scales.reshape(N, 16), L.reshape(N, 16, 16)
    i = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, i[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d = _fp16(np.where(zero, F32(0), F32(1) / iscale))
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
    sc = np.where(zero[:, None], 0, sc).astype(np.int16)
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    L = _requant(x.reshape(N, 16, 16), dl, np.zeros_like(dl), -32, 31, L)
    L = np.where(zero[:, None, None], 0, L)  # the block is zeroed whole
    return L.reshape(N, QK_K), {"d": d, "sc": sc}


#: Each type's quantizer ``(blocks, qw, sigma2) -> (codes, params)``: ``qw`` the blocks'
#: importance (None without an importance matrix), ``sigma2`` the mean square of each block's
#: row (read by the block-32 types' weighted fits).
_QUANTIZERS = {
    GGMLType.Q8_0: lambda x, qw, s2: _q8_0(x),
    GGMLType.Q5_0: lambda x, qw, s2: _qx_0(x, 16, qw, s2),
    GGMLType.Q4_0: lambda x, qw, s2: _qx_0(x, 8, qw, s2),
    GGMLType.Q5_1: lambda x, qw, s2: _qx_1(x, 31, qw, s2),
    GGMLType.Q4_1: lambda x, qw, s2: _qx_1(x, 15, qw, s2),
    GGMLType.IQ4_NL: lambda x, qw, s2: _iq4_nl(x, qw),
    GGMLType.Q2_0: lambda x, qw, s2: _q2_0(x),
    GGMLType.Q6_K: lambda x, qw, s2: _q6_K(x, qw),
    GGMLType.Q5_K: lambda x, qw, s2: _qx_K(x, 31, -0.5, 0.1, 15, qw),
    GGMLType.Q4_K: lambda x, qw, s2: _qx_K(x, 15, -1.0, 0.1, 20, qw),
    GGMLType.Q3_K: lambda x, qw, s2: _q3_K(x, qw),
    GGMLType.Q2_K: lambda x, qw, s2: _q2_K(x, qw),
}

#: Blocks handled per call, bounding the float32 temporaries.
CHUNK_BLOCKS = 1 << 14


def check_importance(importance, cols: int) -> np.ndarray:
    """An importance matrix (one finite non-negative weight per input column) as float32."""
    qw = np.asarray(importance, dtype=np.float32).reshape(-1)
    if qw.shape != (cols,) or not np.isfinite(qw).all() or (qw < 0).any():
        raise ValueError(f"importance must be {cols} finite non-negative weights")
    return qw


def quantize_reference(
    qtype: GGMLType | str | int, W, importance=None
) -> tuple[np.ndarray, GgufGrid]:
    """llama.cpp's codes (int64 ``(rows, cols)``) and grid for ``W`` (``rows x cols``, ``cols``
    a multiple of the type's block size), as ``llama-quantize`` writes them.

    ``importance`` is llama.cpp's importance matrix for the layer: one non-negative weight per
    input column (``cols``), the mean of ``x_j^2`` over the calibration tokens, i.e. the
    diagonal of the layer's Hessian ``H = X^T X`` up to a factor. With it the scales minimise
    the error weighted by it (the ``quantize_row_*_impl`` fits; Q8_0 and Q2_0 ignore it, as
    ggml does); without it they are the ``quantize_row_*_ref`` fits.
    """
    t = as_type(qtype)
    info = type_info(t)
    x = np.asarray(W, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % info.block_size:
        raise FormatError(
            f"{t.name} needs a matrix whose rows are a multiple of {info.block_size} long, "
            f"got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("W must be finite")
    rows, cols = x.shape
    nb = cols // info.block_size
    blocks = x.reshape(-1, info.block_size)
    qw = sigma2 = None
    if importance is not None:
        qw = check_importance(importance, cols)
        qw = np.broadcast_to(qw.reshape(1, nb, info.block_size), (rows, nb, info.block_size))
        qw = qw.reshape(-1, info.block_size)
        sigma2 = np.repeat(sum_sq(x) / F32(cols), nb)
    codes, parts = [], []
    for a in range(0, len(blocks), CHUNK_BLOCKS):
        chunk = slice(a, a + CHUNK_BLOCKS)
        L, p = _QUANTIZERS[t](
            np.ascontiguousarray(blocks[chunk]),
            None if qw is None else np.ascontiguousarray(qw[chunk]),
            None if sigma2 is None else sigma2[chunk],
        )
        codes.append(L)
        parts.append(p)
    fields = {}
    for name in parts[0] if parts else info.params:
        value = np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)
        fields[name] = value.reshape(rows, nb, -1) if value.ndim == 2 else value.reshape(rows, nb)
    grid = GgufGrid(t, (rows, cols), **fields)
    return np.concatenate(codes).reshape(rows, cols).astype(np.int64), grid


def fit_grid(qtype: GGMLType | str | int, W, importance=None) -> GgufGrid:
    """The grid llama.cpp chooses for ``W`` (weighted by ``importance``, the Hessian's diagonal,
    when given): each block's ``d`` (and ``dmin``, ``sc``, ``m``), fixed before any code is
    decoded."""
    return quantize_reference(qtype, W, importance)[1]
