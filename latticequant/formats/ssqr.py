"""The SSQR tensor layout: the GPTQ dense part plus the outliers as a CSR matrix.

``outlier_rowptr`` int32 ``(d_out + 1,)``, ``outlier_col`` int16 (int32 when ``d_in >= 32768``),
``outlier_val`` float16: row-major, columns ascending within a row. At an outlier the dense code
is the zero point, so the dense part contributes 0 there and the CSR value is the whole weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from latticequant.formats.gptq import GPTQ_KEYS, dequantize_gptq, pack_gptq_parts
from latticequant.formats.packing import FormatError, integer_tensor, require_tensor

SSQR_KEYS = GPTQ_KEYS + ("outlier_rowptr", "outlier_col", "outlier_val")


def pack_csr(
    mask: torch.Tensor, values: torch.Tensor, value_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """CSR of the entries of ``values`` (d_out, d_in) where ``mask`` is set, row-major order.

    ``outlier_col`` is int16 when ``d_in < 32768`` (indices fit) and int32 otherwise.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise FormatError("outlier mask must be a 2-D bool tensor (d_out, d_in)")
    if values.shape != mask.shape:
        raise FormatError(
            f"outlier values {tuple(values.shape)} must match the mask {tuple(mask.shape)}"
        )
    d_out, d_in = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major, columns ascending within a row
    val = values[rows, cols]
    if val.numel() and not bool(torch.isfinite(val).all()):
        raise FormatError("outlier values must be finite")
    if val.numel() and float(val.abs().max()) > torch.finfo(value_dtype).max:
        raise FormatError(f"outlier values exceed the range of {value_dtype}")
    counts = torch.bincount(rows, minlength=d_out)
    rowptr = torch.zeros(d_out + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(counts.cpu(), 0)
    if int(rowptr[-1]) >= 1 << 31:
        raise FormatError("too many outliers for int32 row pointers")
    col_dtype = torch.int16 if d_in < 32768 else torch.int32
    return {
        "outlier_rowptr": rowptr.to(torch.int32),
        "outlier_col": cols.to(col_dtype).cpu().contiguous(),
        "outlier_val": val.to(value_dtype).cpu().contiguous(),
    }


def pack_ssqr(
    result,
    outlier_mask: torch.Tensor,
    outlier_values: torch.Tensor,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Pack an SSQR layer: the dense GPTQ part plus CSR outliers.

    At each outlier the dense code is set to the zero point (it contributes 0) and the CSR value
    is the whole weight, taken from ``outlier_values`` (d_out, d_in). Codes elsewhere must lie on
    the b-bit grid.
    """
    bits = int(result.bits)
    codes = integer_tensor(result.codes, "codes")
    if outlier_mask.shape != codes.shape:
        raise FormatError(
            f"outlier mask {tuple(outlier_mask.shape)} must match codes {tuple(codes.shape)}"
        )
    g = integer_tensor(result.g_idx, "g_idx")
    zero_at = integer_tensor(result.zeros, "zeros")[:, g]
    codes = torch.where(outlier_mask, zero_at, codes)
    tensors = pack_gptq_parts(
        codes, result.scales, result.zeros, g, bits, checkpoint_format, scale_dtype
    )
    tensors.update(pack_csr(outlier_mask, outlier_values))
    return tensors


def validate_csr(tensors: Mapping[str, torch.Tensor], d_out: int, d_in: int) -> int:
    """Check the CSR outlier tensors; return the number of outliers."""
    rowptr = require_tensor(tensors, "outlier_rowptr", (torch.int32, torch.int64), 1)
    col = require_tensor(tensors, "outlier_col", (torch.int16, torch.int32, torch.int64), 1)
    val = require_tensor(tensors, "outlier_val", (torch.float16, torch.bfloat16, torch.float32), 1)
    if rowptr.shape != (d_out + 1,):
        raise FormatError(f"'outlier_rowptr' must have shape ({d_out + 1},), got {rowptr.shape}")
    nnz = int(rowptr[-1])
    if int(rowptr[0]) != 0 or bool((rowptr[1:] < rowptr[:-1]).any()):
        raise FormatError("'outlier_rowptr' must start at 0 and be non-decreasing")
    if col.shape != (nnz,) or val.shape != (nnz,):
        raise FormatError(
            f"'outlier_col' and 'outlier_val' must have {nnz} entries (outlier_rowptr[-1]), "
            f"got {tuple(col.shape)} and {tuple(val.shape)}"
        )
    if nnz and (int(col.min()) < 0 or int(col.max()) >= d_in):
        raise FormatError(f"'outlier_col' values must lie in [0, {d_in})")
    return nnz


def csr_to_dense(
    tensors: Mapping[str, torch.Tensor], d_out: int, d_in: int, dtype: torch.dtype
) -> torch.Tensor:
    """The outlier matrix ``(d_out, d_in)`` as a dense tensor of ``dtype``."""
    validate_csr(tensors, d_out, d_in)
    rowptr = tensors["outlier_rowptr"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(d_out), rowptr[1:] - rowptr[:-1])
    dense = torch.zeros(d_out, d_in, dtype=dtype)
    dense[rows, tensors["outlier_col"].to(torch.int64)] = tensors["outlier_val"].to(dtype)
    return dense


def dequantize_ssqr(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat = dense + CSR`` in ``dtype`` (dense part as in ``dequantize_gptq``)."""
    dense = dequantize_gptq(tensors, bits, checkpoint_format, dtype)
    return dense + csr_to_dense(tensors, dense.shape[0], dense.shape[1], dtype)
