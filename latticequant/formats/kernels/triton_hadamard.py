"""Triton kernel for the Walsh-Hadamard transform of rotated layers' inputs.

``x`` is viewed as ``(B, P, S)`` and every program computes ``H_P @ x[b, :, s-tile]`` for one
``b`` and one tile of ``S``: the ``P x P`` Sylvester matrix is built in registers from the
parity of ``i & j`` (nothing is loaded for it) and multiplied with ``tl.dot`` in float32. A
Hadamard transform of order ``a = P_1 P_2 ...`` is one such pass per factor, since Sylvester
matrices factor as Kronecker products (``H_{P_1 P_2} = H_{P_1} (x) H_{P_2}``).

Imported lazily by ``latticequant.formats.kernels``, like the GPTQ kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)


@triton.jit
def hadamard_axis_kernel(
    x_ptr,
    out_ptr,
    P,
    S,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    s0 = tl.program_id(1) * BLOCK_S
    rows = tl.arange(0, BLOCK_P)
    cols = s0 + tl.arange(0, BLOCK_S)
    base = b * P * S
    keep = (rows[:, None] < P) & (cols[None, :] < S)
    x = tl.load(x_ptr + base + rows[:, None] * S + cols[None, :], mask=keep, other=0.0)
    bits = rows[:, None] & rows[None, :]
    bits = bits ^ (bits >> 16)
    bits = bits ^ (bits >> 8)
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    inside = (rows[:, None] < P) & (rows[None, :] < P)
    h = tl.where(inside, 1.0 - 2.0 * (bits & 1).to(tl.float32), 0.0)
    y = tl.dot(h, x.to(tl.float32), input_precision="ieee")
    tl.store(out_ptr + base + rows[:, None] * S + cols[None, :], y, mask=keep)


def hadamard_axis(x, P: int, out) -> None:
    """``out[b] = H_P @ x[b]`` for ``x`` and ``out`` contiguous float32 ``(B, P, S)``."""
    B, _, S = x.shape
    block_p = max(16, triton.next_power_of_2(P))
    block_s = 32 if block_p >= 64 else 64
    grid = (B, triton.cdiv(S, block_s))
    hadamard_axis_kernel[grid](x, out, P, S, BLOCK_P=block_p, BLOCK_S=block_s)
