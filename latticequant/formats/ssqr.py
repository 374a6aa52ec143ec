"""The SSQR tensor layout: the GPTQ dense part plus the outliers as a CSR matrix.

``outlier_rowptr`` int32 ``(d_out + 1,)``, ``outlier_col`` int16 (int32 when ``d_in >= 32768``),
``outlier_val`` float16: row-major, columns ascending within a row. At an outlier the dense code
is the zero point, so the dense part contributes 0 there and the CSR value is the whole weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from latticequant.formats import kernels
from latticequant.formats.gptq import (
    GPTQ_KEYS,
    GPTQ_V1,
    GPTQFormat,
    QuantLinear,
    check_grid_claim,
    check_meta_dims,
    check_packable,
    dequantize_gptq,
    module_options,
    pack_gptq_parts,
    unpack_gptq,
)
from latticequant.formats.packing import (
    CHECKPOINT_FORMATS,
    FormatError,
    integer_tensor,
    require_tensor,
)
from latticequant.formats.protocol import Format, register_format

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


class SSQRLinear(QuantLinear):
    """SSQR layer: the GPTQ dense part (symmetric grid) plus CSR outliers, ``W = dense + S``.

    The outliers are a second pass: a Triton CSR kernel on the kernel path, a torch sparse CSR
    matmul on the CPU path (folded into the cached weight when caching).
    """

    _stored_precision = ("scales", "zeros", "outlier_val")

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        bits: int,
        checkpoint_format: str = "gptq",
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        cache_weight: bool | None = None,
    ) -> None:
        super().__init__(tensors, bits, checkpoint_format, bias, backend, cache_weight)
        self.n_outliers = validate_csr(tensors, self.out_features, self.in_features)
        self.register_buffer("outlier_rowptr", tensors["outlier_rowptr"].to(torch.int32).clone())
        self.register_buffer("outlier_col", tensors["outlier_col"].clone())
        self.register_buffer("outlier_val", tensors["outlier_val"].clone())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outliers={self.n_outliers}"

    def outliers(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The outlier matrix ``S`` ``(d_out, d_in)`` as a sparse CSR tensor."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta": nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.outlier_rowptr.to(torch.int64),
                self.outlier_col.to(torch.int64),
                self.outlier_val.to(dtype),
                size=(self.out_features, self.in_features),
                check_invariants=False,  # validated at load
            )

    def dequantize_weight_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(dense + S)^T`` in the original input order."""
        return super().dequantize_weight_t(dtype) + self.outliers(dtype).to_dense().t()

    def _dense_weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_weight_t(dtype)  # the outliers folded into the cached weight

    def _torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
        xc = x2.to(compute)
        if self.caches_weight:
            self.last_kernel = "torch-dense"
            return xc @ self._weight_t_for(compute)
        self.last_kernel = "torch-packed"
        y = self._packed_matmul(xc)
        if self.n_outliers:
            y = y + torch.sparse.mm(self.outliers(compute), xc.t()).t()
        return y

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        self.last_kernel = "triton"
        y = self._kernel_dense(x2, x2.dtype if x2.dtype != torch.float64 else torch.float32)
        if self.n_outliers:
            xk = x2 if x2.dtype != torch.float64 else x2.float()
            kernels.csr_matmul_add(xk, self.outlier_rowptr, self.outlier_col, self.outlier_val, y)
        return y


class SSQRFormat(Format):
    """SSQR: the GPTQ dense part (symmetric, zero points in the v1 convention) and float16 CSR
    outliers. GPTQ readers would drop the outliers, so the file does not pass for GPTQ."""

    name = "ssqr"
    keys = SSQR_KEYS
    key_kinds = {
        **GPTQFormat.key_kinds,
        "outlier_val": "outlier values",
        "outlier_col": "outlier indices",
        "outlier_rowptr": "outlier row pointers",
    }
    kernels = GPTQFormat.kernels

    def check(self, config, d_out: int | None = None, d_in: int | None = None) -> None:
        check_packable(config.bits, d_out, d_in)

    def pack(self, result) -> dict[str, torch.Tensor]:
        return pack_ssqr(result, result.outliers, result.values, checkpoint_format="gptq")

    def unpack(self, tensors, meta):
        """The dense part's ``(codes, scales, zeros, g_idx)``; the outliers are CSR tensors."""
        return unpack_gptq(tensors, int(meta["bits"]), _zeros_convention(meta))

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ssqr(tensors, int(meta["bits"]), _zeros_convention(meta), dtype)

    def module(self, tensors, meta, bias=None) -> nn.Module:
        module = SSQRLinear(
            tensors, int(meta["bits"]), _zeros_convention(meta), bias, **module_options(meta)
        )
        check_meta_dims(meta, module.in_features, module.out_features)
        return module

    def file_config(self, base, meta) -> dict:
        config = GPTQ_V1.file_config(base, meta)
        config.update(checkpoint_format=self.name, format=self.name, quant_method=self.quant_method)
        return config

    def check_file_config(self, name, tensors, meta, file_config) -> None:
        """The dense part's code width, groups, act-order and symmetry as the file-level config
        says them for this layer."""
        super().check_file_config(name, tensors, meta, file_config)
        claim = self.layer_claim(name, file_config)
        check_grid_claim(tensors, claim, file_config, _zeros_convention(meta))

    def module_meta(self, entry, file_config, name: str = "") -> dict:
        meta = super().module_meta(entry, file_config, name)
        # files written before SSQR was a format of its own name the dense part's convention
        if file_config.get("checkpoint_format") in CHECKPOINT_FORMATS:
            meta["zeros"] = file_config["checkpoint_format"]
        return meta


def _zeros_convention(meta) -> str:
    return str(meta.get("zeros", "gptq"))


SSQR = register_format(SSQRFormat())
