"""Triton kernel for HPTQ layers: Huffman chunks decoded in registers and fed to the matmul.

Each program owns ``BLOCK_C`` chunks of the stream (a chunk is ``CHUNK_ROWS`` output rows, its
start bit stored in ``hptq_offsets``) and one tile of input rows. Its chunks are decoded in
lockstep, one code per chunk per step: a 40-bit window at each chunk's bit position, the code
length from the canonical thresholds (one compare per length, vectorised), the symbol from the
table. ``BLOCK_K`` steps fill a ``(BLOCK_C, BLOCK_K)`` weight tile that never leaves the chip
and goes straight into ``tl.dot``. Codes up to 33 bits long are read (HPTQ limits them to 32).

Imported lazily by ``latticequant.formats.kernels``, like the GPTQ kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)


@triton.jit
def hptq_matmul_kernel(
    x_ptr,
    stream_ptr,
    offsets_ptr,
    limits_ptr,
    base_ptr,
    symbols_ptr,
    out_ptr,
    M,
    N,
    K,
    N_BYTES,
    N_CHUNKS,
    CHUNK_ROWS,
    scale,
    L: tl.constexpr,
    L_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[M, N] = x[M, K] @ W^T``, ``W = scale * codes`` decoded chunk by chunk."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < N_CHUNKS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    cols = tl.arange(0, BLOCK_K)
    pos = tl.load(offsets_ptr + offs_c, mask=c_mask, other=0).to(tl.int64)
    # canonical thresholds, padded with a value no window reaches
    li = tl.arange(0, L_POW2)
    limits = tl.load(limits_ptr + li, mask=li < L - 1, other=1 << 40)
    window_mask = (1 << L) - 1
    for i in range(0, CHUNK_ROWS):
        rows = offs_c * CHUNK_ROWS + i
        r_mask = c_mask & (rows < N)
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            tile = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
            for kk in range(0, BLOCK_K):
                live = r_mask & ((offs_c * 0 + k0 + kk) < K)
                byte = pos >> 3
                word = tl.zeros((BLOCK_C,), dtype=tl.int64)
                for b in tl.static_range(5):
                    ok = live & (byte + b < N_BYTES)
                    v = tl.load(stream_ptr + byte + b, mask=ok, other=0).to(tl.int64)
                    word = (word << 8) | v
                w = (word >> (40 - L - (pos & 7))) & window_mask
                length = 1 + tl.sum((w[:, None] >= limits[None, :]).to(tl.int64), axis=1)
                rank = tl.load(base_ptr + length, mask=live, other=0) + (w >> (L - length))
                sym = tl.load(symbols_ptr + rank, mask=live, other=0.0)
                tile = tl.where(cols[None, :] == kk, sym[:, None], tile)
                pos = tl.where(live, pos + length, pos)
            offs_k = k0 + cols
            xt = tl.load(
                x_ptr + offs_m[:, None] * K + offs_k[None, :],
                mask=m_mask[:, None] & (offs_k < K)[None, :],
                other=0.0,
            )
            acc = tl.dot(xt.to(tl.float32), tl.trans(tile), acc, input_precision="ieee")
        tl.store(
            out_ptr + offs_m[:, None] * N + rows[None, :],
            (acc * scale).to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & r_mask[None, :],
        )
