"""Triton kernels for GPTQ-packed weights: a tiled GEMM, a split-K GEMV, and a CSR outlier pass.

Weights are read in the GPTQ bit-stream layout (``latticequant.formats``): code ``k`` of an output
column sits at bits ``[k*b, (k+1)*b)`` of the column's stream of int32 words, so the word and the
shift of a row follow from ``k * b`` alone and one code path serves 2, 3, 4 and 8 bits; only 3-bit
codes 10 and 21 of each 32-code block straddle two words and need the next word too.

Rows are in the layer's *sorted* input order (act-order permutations are applied once at load),
so a tile of ``BLOCK_K`` rows that lies inside one group reads one row of scales and zeros.

This module is imported lazily by ``latticequant.formats.kernels``: ``triton.jit`` decides at
decoration time whether to compile for a GPU or to build the CPU interpreter
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)


@triton.jit
def _dequant_tile(
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    gidx_ptr,
    offs_k,
    k_mask,
    offs_n,
    n_mask,
    k0,
    N,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
):
    """The float32 weights of rows ``offs_k`` x columns ``offs_n``, unpacked from the stream."""
    maxq: tl.constexpr = (1 << BITS) - 1
    mask2 = k_mask[:, None] & n_mask[None, :]
    # codes: word and shift of each row from its bit offset k * BITS
    bit = offs_k * BITS
    shift = (bit % 32).to(tl.uint32)
    wp = qw_ptr + (bit // 32)[:, None] * N + offs_n[None, :]
    word = tl.load(wp, mask=mask2, other=0).to(tl.uint32, bitcast=True)
    q = word >> shift[:, None]
    if BITS == 3:
        straddle = shift > 29
        nxt = tl.load(wp + N, mask=mask2 & straddle[:, None], other=0)
        q = q | (nxt.to(tl.uint32, bitcast=True) << ((32 - shift) & 31)[:, None])
    q = (q & maxq).to(tl.float32)
    # grid of the rows: one group for the whole tile, or one group per row
    if TILE_IN_GROUP:
        g = k0 // GROUP_SIZE
        s = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = (q - z[None, :]) * s[None, :]
    else:
        g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
        gp = g[:, None] * N + offs_n[None, :]
        s = tl.load(scales_ptr + gp, mask=mask2, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + gp, mask=mask2, other=0.0).to(tl.float32)
        w = (q - z) * s
    return w


@triton.jit
def gptq_gemm_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    gidx_ptr,
    out_ptr,
    M,
    N,
    K,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[M, N] = x[M, K] @ W[K, N]``, W dequantized tile by tile in registers.

    ``DOT_F32`` multiplies in float32 (float32 inputs, and bfloat16 under the CPU interpreter,
    whose bfloat16 ``tl.dot`` is wrong in Triton 3.x); otherwise in the input's dtype.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = _dequant_tile(
            qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, offs_k, k_mask, offs_n, n_mask, k0, N,
            BITS, GROUP_SIZE, TILE_IN_GROUP,
        )  # fmt: skip
        xt = tl.load(
            x_ptr + offs_m[:, None] * K + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), w, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(xt, w.to(xt.dtype), acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + offs_m[:, None] * N + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def gptq_gemv_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    gidx_ptr,
    out_ptr,
    M,
    N,
    K,
    K_PER_PROGRAM,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Split-K GEMV for small batches (M <= BLOCK_M <= 8).

    Each program dequantizes its ``K_PER_PROGRAM x BLOCK_N`` slice once and reduces it against
    every input row on the CUDA cores (no tensor-core padding to 16 rows). With ``ATOMIC`` the
    K range is split over programs and partial sums are added into the float32 ``out``; without,
    one program covers all of K and stores its tile in ``out``'s dtype.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_PROGRAM
    k_end = tl.minimum(k_start + K_PER_PROGRAM, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        w = _dequant_tile(
            qw_ptr, scales_ptr, zeros_ptr, gidx_ptr, offs_k, k_mask, offs_n, n_mask, k0, N,
            BITS, GROUP_SIZE, TILE_IN_GROUP,
        )  # fmt: skip
        for m in tl.static_range(BLOCK_M):
            row_ok = tl.full((BLOCK_K,), m, tl.int32) < M
            xm = tl.load(x_ptr + m * K + offs_k, mask=k_mask & row_ok, other=0.0)
            part = tl.sum(xm.to(tl.float32)[:, None] * w, axis=0)
            acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
    optr = out_ptr + rows[:, None] * N + offs_n[None, :]
    omask = (rows[:, None] < M) & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(optr, acc, mask=omask)
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def csr_add_kernel(
    x_ptr,
    rowptr_ptr,
    col_ptr,
    val_ptr,
    out_ptr,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_NNZ: tl.constexpr,
):
    """``out[:, n] += x[:, col] @ val`` over the outliers of weight row ``n`` (one program each).

    Every program owns its output column, so the update needs no atomics.
    """
    n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    start = tl.load(rowptr_ptr + n)
    end = tl.load(rowptr_ptr + n + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NNZ):
        offs = j0 + tl.arange(0, BLOCK_NNZ)
        j_mask = offs < end
        col = tl.load(col_ptr + offs, mask=j_mask, other=0).to(tl.int32)
        val = tl.load(val_ptr + offs, mask=j_mask, other=0.0).to(tl.float32)
        xv = tl.load(
            x_ptr + offs_m[:, None] * K + col[None, :],
            mask=m_mask[:, None] & j_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(xv.to(tl.float32) * val[None, :], axis=1)
    optr = out_ptr + offs_m * N + n
    prev = tl.load(optr, mask=m_mask, other=0.0)
    tl.store(optr, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=m_mask)
