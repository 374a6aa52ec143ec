"""Inference kernels for packed weights: Triton on CUDA (or the Triton CPU interpreter).

``hptq_matmul`` multiplies by an HPTQ layer, decoding its Huffman chunks inside the kernel.
``gptq_matmul`` computes ``x @ W^T`` for a GPTQ-packed ``W`` whose input rows are in sorted group
order (``latticequant.formats.qlinear.QuantLinear`` prepares that once at load), choosing the
split-K GEMV kernel for batches of 1 to 8 rows and the tiled GEMM kernel above. ``csr_matmul_add``
adds the SSQR outliers in a second pass. Both need CUDA tensors, or ``TRITON_INTERPRET=1`` for CPU
tensors (the interpreter runs the very same kernels, slowly, for tests).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from latticequant.formats.packing import SUPPORTED_BITS

GEMV_MAX_BATCH = 8

_modules: dict[str, ModuleType] = {}


class KernelUnavailable(RuntimeError):
    """Triton is missing, or the tensors are on the CPU without the Triton interpreter."""


def interpret_mode() -> bool:
    """Whether Triton interprets kernels on the CPU (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")
    return bool(knobs.runtime.interpret)


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels(name: str = "triton_gptq") -> ModuleType:
    """A kernel module, (re)built so that it matches the current interpreter setting."""
    if not triton_importable():
        raise KernelUnavailable("triton is not installed (pip install triton)")
    module = _modules.get(name)
    if module is None:
        module = importlib.import_module(f"latticequant.formats.kernels.{name}")
    if module.INTERPRET != interpret_mode():
        module = importlib.reload(module)
    _modules[name] = module
    return module


def kernels_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpret_mode())


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError("all kernel inputs must be on the same device")
    if not kernels_usable(dev):
        raise KernelUnavailable(
            f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU ones); got {dev}"
        )


def tile_in_group(group_size: int, block_k: int) -> bool:
    """Whether every ``block_k`` tile of rows lies in a single group of ``group_size`` rows."""
    return group_size > 0 and group_size % block_k == 0


def _pow2_at_most(n: int, cap: int) -> int:
    p = 16
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _gemv_tiles(
    N: int, K: int, group_size: int, device: torch.device, blocks: dict
) -> tuple[int, int, int]:
    """GEMV tiles: the widest column tile that still gives every multiprocessor a program;
    split K (atomics) only when even 32 columns per program leave half of them idle."""
    sms = _multiprocessors(device)
    block_k = blocks.get("BLOCK_K", _pow2_at_most(K, 64))
    if group_size > 0:
        block_k = min(block_k, _pow2_at_most(group_size, block_k))
    if "BLOCK_N" in blocks:
        block_n = blocks["BLOCK_N"]
    else:
        block_n = next((b for b in (128, 64) if _cdiv(N, b) >= sms), 32)
        block_n = min(block_n, max(16, 1 << max(N - 1, 1).bit_length()))
    n_tiles = _cdiv(N, block_n)
    split = 1 if 2 * n_tiles >= sms else min(_cdiv(K, block_k), _cdiv(sms, n_tiles))
    split = blocks.get("SPLIT_K", split)
    return block_n, block_k, split


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int = 0,
    out_dtype: torch.dtype | None = None,
    path: str = "auto",
    block_sizes: dict | None = None,
) -> torch.Tensor:
    """``x (M, K) @ W^T`` with ``W (N, K)`` stored GPTQ-packed in sorted group order.

    qweight int32 ``(K * bits / 32, N)``; scales and zeros ``(G, N)`` (zeros as floats, already
    decoded from the checkpoint convention); g_idx int32 ``(K,)``, non-decreasing.
    ``group_size > 0`` promises ``g_idx[k] == k // group_size`` (uniform groups), which lets a
    tile read one row of scales; 0 makes every row look its group up.
    ``path``: "auto" (GEMV for M <= 8, else GEMM), "gemv" or "gemm".
    Returns ``(M, N)`` in ``out_dtype`` (default ``x.dtype``).
    """
    M, K, N = _check_gptq_operands(x, qweight, scales, zeros, g_idx, bits, path)
    _check_device(x, qweight, scales, zeros, g_idx)
    kern = _kernels()
    out_dtype = out_dtype or x.dtype
    x = x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    blocks = dict(block_sizes or {})
    if path == "gemv" or (path == "auto" and M <= GEMV_MAX_BATCH):
        return _gptq_gemv(x, qweight, scales, zeros, g_idx, bits, group_size, out_dtype, blocks)
    block_m = blocks.get("BLOCK_M", 64 if M >= 64 else (32 if M >= 32 else 16))
    block_n = blocks.get("BLOCK_N", 64 if N >= 64 else _pow2_at_most(N, 64))
    block_k = blocks.get("BLOCK_K", _pow2_at_most(K, 64))
    if group_size > 0:
        block_k = min(block_k, _pow2_at_most(group_size, block_k))
    # The interpreter's bfloat16 tl.dot is wrong (Triton 3.x on CPU): multiply in float32 there.
    dot_f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpret_mode())
    out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    kern.gptq_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        g_idx,
        out,
        M,
        N,
        K,
        BITS=bits,
        GROUP_SIZE=max(group_size, 1),
        TILE_IN_GROUP=tile_in_group(group_size, block_k),
        INPUT_PRECISION="ieee" if dot_f32 else None,
        DOT_F32=dot_f32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=blocks.get("num_warps", 4),
        num_stages=blocks.get("num_stages", 3),
    )
    return out


def _check_gptq_operands(x, qweight, scales, zeros, g_idx, bits: int, path: str):
    """``(M, K, N)`` of valid operands of :func:`gptq_matmul`; a one-line error otherwise."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    M, K = x.shape
    N = qweight.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] * 32 != K * bits:
        raise ValueError(
            f"qweight must be int32 ({K * bits // 32}, N) for K={K} at {bits} bits, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if scales.shape != zeros.shape or scales.dim() != 2 or scales.shape[1] != N:
        raise ValueError(f"scales and zeros must both be (G, {N})")
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if path not in ("auto", "gemv", "gemm"):
        raise ValueError(f"path must be 'auto', 'gemv' or 'gemm', got {path!r}")
    return M, K, N


def _gptq_gemv(x, qweight, scales, zeros, g_idx, bits, group_size, out_dtype, blocks):
    """The GEMV path of :func:`gptq_matmul` (at most ``GEMV_MAX_BATCH`` rows of x)."""
    M, K = x.shape
    N = qweight.shape[1]
    kern = _kernels()
    if M > GEMV_MAX_BATCH:
        raise ValueError(f"the GEMV path takes at most {GEMV_MAX_BATCH} rows, got {M}")
    block_m = max(1, 1 << (M - 1).bit_length())
    block_n, block_k, split = _gemv_tiles(N, K, group_size, x.device, blocks)
    k_per = _cdiv(_cdiv(K, block_k), split) * block_k
    split = _cdiv(K, k_per)
    atomic = split > 1
    if atomic:  # partial sums of the K slices meet in a float32 buffer
        out = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:  # one program per column tile: store the result directly
        out = torch.empty(M, N, device=x.device, dtype=out_dtype)
    kern.gptq_gemv_kernel[(_cdiv(N, block_n), split)](
        x,
        qweight,
        scales,
        zeros,
        g_idx,
        out,
        M,
        N,
        K,
        k_per,
        BITS=bits,
        GROUP_SIZE=max(group_size, 1),
        TILE_IN_GROUP=tile_in_group(group_size, block_k),
        ATOMIC=atomic,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=blocks.get("num_warps", 4),
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


def csr_matmul_add(
    x: torch.Tensor,
    rowptr: torch.Tensor,
    col: torch.Tensor,
    val: torch.Tensor,
    out: torch.Tensor,
    block_nnz: int = 32,
) -> torch.Tensor:
    """``out += x @ S^T`` in place, ``S (N, K)`` in CSR (rowptr, col, val); returns ``out``."""
    if x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError("x must be (M, K) and out (M, N)")
    M, K = x.shape
    N = out.shape[1]
    if rowptr.shape != (N + 1,):
        raise ValueError(f"rowptr must have shape ({N + 1},)")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is updated in place)")
    _check_device(x, rowptr, col, val, out)
    kern = _kernels()
    x = x.contiguous()
    block_m = min(16, max(1, 1 << (M - 1).bit_length()))
    grid = (N, _cdiv(M, block_m))
    kern.csr_add_kernel[grid](
        x,
        rowptr.contiguous(),
        col.contiguous(),
        val.contiguous(),
        out,
        M,
        N,
        K,
        BLOCK_M=block_m,
        BLOCK_NNZ=block_nnz,
        num_warps=1,
    )
    return out


def hptq_matmul(
    x: torch.Tensor,
    stream: torch.Tensor,
    offsets: torch.Tensor,
    limits: torch.Tensor,
    base: torch.Tensor,
    symbols: torch.Tensor,
    scale: float,
    n_out: int,
    chunk_rows: int,
    out_dtype: torch.dtype | None = None,
    block_sizes: dict | None = None,
) -> torch.Tensor:
    """``x (M, K) @ W^T`` with ``W (n_out, K) = scale * codes`` stored as an HPTQ stream.

    stream uint8; offsets int32, the start bit of each chunk of ``chunk_rows`` rows; limits,
    base and symbols the canonical decoding constants of the table
    (:func:`latticequant.formats.huffman.canonical_constants`; symbols as float32 with one
    padding entry).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if stream.dtype != torch.uint8 or offsets.dtype != torch.int32:
        raise ValueError("stream must be uint8 and offsets int32")
    n_chunks = _cdiv(n_out, chunk_rows)
    if offsets.shape != (n_chunks,):
        raise ValueError(f"offsets must have shape ({n_chunks},)")
    L = limits.numel()
    if not 1 <= L <= 33:
        raise ValueError(f"codes of 1 to 33 bits are supported, the table's longest is {L}")
    _check_device(x, stream, offsets, limits, base, symbols)
    kern = _kernels("triton_hptq")
    M, K = x.shape
    blocks = dict(block_sizes or {})
    block_m = blocks.get("BLOCK_M", 16 if M <= 16 else (32 if M <= 32 else 64))
    block_c = blocks.get("BLOCK_C", 32 if n_chunks >= 32 else 16)
    block_k = blocks.get("BLOCK_K", 32 if K >= 32 else 16)
    out = torch.empty(M, n_out, device=x.device, dtype=out_dtype or x.dtype)
    grid = (_cdiv(n_chunks, block_c), _cdiv(M, block_m))
    kern.hptq_matmul_kernel[grid](
        x.contiguous(),
        stream.contiguous(),
        offsets.contiguous(),
        limits.to(torch.int64).contiguous(),
        base.to(torch.int64).contiguous(),
        symbols.to(torch.float32).contiguous(),
        out,
        M,
        n_out,
        K,
        stream.numel(),
        n_chunks,
        chunk_rows,
        float(scale),
        L=L,
        L_POW2=max(2, 1 << max(L - 1, 1).bit_length()),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
        num_warps=blocks.get("num_warps", 4),
    )
    return out


HADAMARD_MAX_PASS = 128  # largest Sylvester order one kernel pass builds in registers


def hadamard_transform(x: torch.Tensor, a: int) -> torch.Tensor:
    """``H_a`` (unnormalised Sylvester, ``a`` a power of two) applied along axis -2 of ``x``
    (shape ``(..., a, m)``), in float32: one kernel pass per factor of at most
    :data:`HADAMARD_MAX_PASS` of ``a``."""
    if a <= 0 or a & (a - 1):
        raise ValueError(f"the Hadamard order must be a power of two, got {a}")
    if x.dim() < 2 or x.shape[-2] != a:
        raise ValueError(f"x must have shape (..., {a}, m), got {tuple(x.shape)}")
    _check_device(x)
    kern = _kernels("triton_hadamard")
    lead, m = x.shape[:-2], x.shape[-1]
    y = x.to(torch.float32).contiguous().reshape(-1, a * m)
    outer = 1  # the factors already applied, leftmost in the Kronecker product
    while outer < a:
        P = min(HADAMARD_MAX_PASS, a // outer)
        inner = a // (outer * P)
        view = y.reshape(-1, P, inner * m)  # (rows * outer, P, inner * m)
        out = torch.empty_like(view)
        kern.hadamard_axis(view, P, out)
        y = out.reshape(-1, a * m)
        outer *= P
    return y.reshape(*lead, a, m)
