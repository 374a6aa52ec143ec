"""The GPTQ tensor layout of one linear layer, the one the ecosystem loads.

``W`` is ``(d_out, d_in)``, ``b`` bits, ``G`` groups:

- ``qweight`` int32 ``(d_in * b / 32, d_out)``: codes packed along the input dimension;
- ``qzeros``  int32 ``(G, d_out * b / 32)``: zero points packed along the output dimension;
- ``scales``  float16 ``(G, d_out)``;
- ``g_idx``   int32 ``(d_in,)``: group of each input column (any order: act-order included).

Bits and zero points are packed as :mod:`latticequant.formats.packing` describes. Scales are
stored in float16: a weight dequantized from the file equals the in-memory ``Q`` only up to the
float16 rounding of the scales; it equals ``fp16(scales) * (codes - zeros)`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from latticequant.formats.packing import (
    WORD_BITS,
    FormatError,
    check_bits,
    check_checkpoint_format,
    check_divisible,
    integer_tensor,
    pack_codes,
    pack_granularity,
    pack_zeros,
    require_tensor,
    unpack_codes,
    unpack_zeros,
)

GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def is_permuted(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx`` is not the natural ``j // group_size`` (act-order without static
    groups): what ``desc_act`` must say, since readers that skip ``g_idx`` assume the natural one.
    """
    g = g_idx.to(torch.int64).cpu()
    d_in = g.numel()
    natural = torch.zeros(d_in, dtype=torch.int64)
    if group_size > 0:
        natural = torch.arange(d_in, dtype=torch.int64) // group_size
    return not torch.equal(g, natural)


def pack_gptq_parts(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Pack codes ``(d_out, d_in)``, scales/zeros ``(d_out, G)`` and ``g_idx`` ``(d_in,)``."""
    check_bits(bits)
    check_checkpoint_format(checkpoint_format)
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D (d_out, d_in), got shape {tuple(codes.shape)}")
    d_out, d_in = codes.shape
    check_divisible(d_in, bits, "d_in (input features)")
    check_divisible(d_out, bits, "d_out (output features)")
    if scales.dim() != 2 or scales.shape[0] != d_out:
        raise FormatError(f"scales must be (d_out={d_out}, n_groups), got {tuple(scales.shape)}")
    if zeros.shape != scales.shape:
        raise FormatError(
            f"zeros must have the shape of scales {tuple(scales.shape)}, got {tuple(zeros.shape)}"
        )
    if not scales.is_floating_point() or not bool(torch.isfinite(scales).all()):
        raise FormatError("scales must be finite floating-point values")
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise FormatError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
    if scales.numel() and float(scales.abs().max()) > torch.finfo(scale_dtype).max:
        raise FormatError(f"scales exceed the range of {scale_dtype}")
    n_groups = scales.shape[1]
    g = integer_tensor(g_idx, "g_idx")
    if g.shape != (d_in,):
        raise FormatError(f"g_idx must have shape ({d_in},), got {tuple(g_idx.shape)}")
    if d_in and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise FormatError(f"g_idx values must lie in [0, {n_groups}) (the number of groups)")
    c = integer_tensor(codes, "codes")
    maxq = (1 << bits) - 1
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > maxq):
        raise FormatError(
            f"codes leave the {bits}-bit grid [0, {maxq}] (an unclipped result?): the GPTQ "
            f"format cannot store them; use a format with outliers such as ssqr"
        )
    z = integer_tensor(zeros, "zeros")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > maxq):
        raise FormatError(f"zero points must lie in [0, {maxq}]")
    return {
        "qweight": pack_codes(c.t(), bits, dim=0),
        "qzeros": pack_zeros(z.t(), bits, checkpoint_format),
        "scales": scales.t().to(scale_dtype).contiguous(),
        "g_idx": g.to(torch.int32).contiguous(),
    }


def pack_gptq(
    result, checkpoint_format: str = "gptq", scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Pack a ``QuantResult`` into the GPTQ tensors ``qweight/qzeros/scales/g_idx``.

    Raises ``FormatError`` when a dimension does not fit the packing, when codes leave the
    b-bit grid (unclipped results) or when a v1 zero point is 0; the methods refuse all of
    these before a run starts (``Method.check``), so none reaches here from the pipeline.
    """
    return pack_gptq_parts(
        result.codes,
        result.scales,
        result.zeros,
        result.g_idx,
        int(result.bits),
        checkpoint_format=checkpoint_format,
        scale_dtype=scale_dtype,
    )


@dataclass(frozen=True)
class GPTQShape:
    """Dimensions of a validated GPTQ tensor set."""

    d_in: int
    d_out: int
    n_groups: int


def validate_gptq(tensors: Mapping[str, torch.Tensor], bits: int) -> GPTQShape:
    """Check keys, dtypes and shapes of a GPTQ tensor set; name the key at fault."""
    check_bits(bits)
    qweight = require_tensor(tensors, "qweight", (torch.int32,), 2)
    qzeros = require_tensor(tensors, "qzeros", (torch.int32,), 2)
    scales = require_tensor(tensors, "scales", (torch.float16, torch.bfloat16, torch.float32), 2)
    g_idx = require_tensor(tensors, "g_idx", (torch.int32, torch.int64), 1)
    rows, d_out = qweight.shape
    if (rows * WORD_BITS) % bits or ((rows * WORD_BITS) // bits) % pack_granularity(bits):
        raise FormatError(f"'qweight' has {rows} rows, not a whole number of {bits}-bit blocks")
    d_in = rows * WORD_BITS // bits
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, d_out) or n_groups == 0:
        raise FormatError(f"'scales' must be (n_groups, {d_out}), got {tuple(scales.shape)}")
    if d_out % pack_granularity(bits):
        raise FormatError(f"'qweight' has {d_out} columns, not packable in {bits} bits along d_out")
    if qzeros.shape != (n_groups, d_out * bits // WORD_BITS):
        raise FormatError(
            f"'qzeros' must be ({n_groups}, {d_out * bits // WORD_BITS}), got {tuple(qzeros.shape)}"
        )
    if g_idx.shape != (d_in,):
        raise FormatError(
            f"'qweight' {tuple(qweight.shape)} holds {d_in} input rows at {bits} bits but "
            f"'g_idx' has {g_idx.shape[0]} entries (truncated or mismatched tensors)"
        )
    if d_in and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise FormatError(f"'g_idx' values must lie in [0, {n_groups})")
    return GPTQShape(d_in=d_in, d_out=d_out, n_groups=n_groups)


def unpack_gptq(
    tensors: Mapping[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_gptq``: ``(codes, scales, zeros, g_idx)`` in ``QuantResult`` layout.

    codes int64 ``(d_out, d_in)``; scales ``(d_out, G)`` in the stored dtype; zeros int64
    ``(d_out, G)``; g_idx int64 ``(d_in,)``.
    """
    check_checkpoint_format(checkpoint_format)
    shape = validate_gptq(tensors, bits)
    codes = unpack_codes(tensors["qweight"], bits, shape.d_in, dim=0).t().contiguous()
    zeros = unpack_zeros(tensors["qzeros"], bits, shape.d_out, checkpoint_format).t().contiguous()
    scales = tensors["scales"].t().contiguous()
    return codes, scales, zeros, tensors["g_idx"].to(torch.int64)


def dequantize_gptq(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W (d_out, d_in) = scales[:, g_idx] * (codes - zeros[:, g_idx])`` computed in ``dtype``.

    Equals the quantizer's ``Q`` up to the rounding of the scales to the stored dtype.
    """
    codes, scales, zeros, g_idx = unpack_gptq(tensors, bits, checkpoint_format)
    return scales.to(dtype)[:, g_idx] * (codes.to(dtype) - zeros.to(dtype)[:, g_idx])
