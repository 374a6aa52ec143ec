"""The HPTQ tensor layout: one canonical Huffman bitstream of integer codes and one scale.

Stored tensors (keys without the module prefix): ``hptq_stream`` uint8 (the bitstream, padded
to a byte), ``hptq_table`` uint8 (the serialised code table), ``hptq_scale`` float16 (1,),
``hptq_shape`` int32 (2,). ``W = scale * codes``; :class:`HuffmanLinear` decodes them on the
CPU at load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from latticequant.formats import huffman
from latticequant.formats.bits import effective_bits
from latticequant.formats.packing import FormatError

__all__ = [
    "HPTQ_KEYS",
    "validate_hptq",
    "decode_hptq",
    "dequantize_hptq",
    "HuffmanLinear",
    "build_hptq_module",
]

HPTQ_KEYS = ("hptq_stream", "hptq_table", "hptq_scale", "hptq_shape")


def validate_hptq(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Keys, dtypes and shapes of a stored layer; a ``FormatError`` naming the key at fault."""
    missing = [k for k in HPTQ_KEYS if k not in tensors]
    if missing:
        raise FormatError(f"HPTQ tensors lack {missing} (have {sorted(tensors)})")
    for key, dtype, shape in (
        ("hptq_stream", torch.uint8, None),
        ("hptq_table", torch.uint8, None),
        ("hptq_scale", torch.float16, (1,)),
        ("hptq_shape", torch.int32, (2,)),
    ):
        t = tensors[key]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
            raise FormatError(f"{key!r} must be a 1-D {dtype} tensor")
        if shape is not None and tuple(t.shape) != shape:
            raise FormatError(f"{key!r} must have shape {shape}, got {tuple(t.shape)}")
    d_out, d_in = (int(x) for x in tensors["hptq_shape"])
    if d_out <= 0 or d_in <= 0:
        raise FormatError(f"'hptq_shape' must be positive, got ({d_out}, {d_in})")
    scale = float(tensors["hptq_scale"][0])
    if not (math.isfinite(scale) and scale > 0):
        raise FormatError(f"'hptq_scale' must be finite and positive, got {scale}")
    return d_out, d_in


def decode_hptq(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The integer codes (int64, ``(d_out, d_in)``) decoded from the stored stream on the CPU."""
    d_out, d_in = validate_hptq(tensors)
    table = huffman.HuffmanTable.from_bytes(tensors["hptq_table"])
    codes = huffman.decode(tensors["hptq_stream"], table, d_out * d_in)
    return torch.from_numpy(codes).reshape(d_out, d_in)


def dequantize_hptq(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale * codes`` in ``dtype``: the quantizer's ``Q`` bit for bit (same dtype)."""
    codes = decode_hptq(tensors)
    scale = tensors["hptq_scale"].to(dtype)
    return scale * (codes.to(dtype) - 0.0)


class HuffmanLinear(nn.Module):
    """A linear layer stored as an HPTQ Huffman stream, decoded into a dense weight at load.

    The stored tensors stay registered (they are what ``state_dict`` saves); the dense weight
    is a non-persistent buffer, rebuilt from them.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        d_out, d_in = validate_hptq(tensors)
        self.in_features, self.out_features = d_in, d_out
        for key in HPTQ_KEYS:
            self.register_buffer(key, tensors[key].detach().cpu().clone())
        self.register_buffer("weight", dequantize_hptq(tensors, dtype), persistent=False)
        if bias is not None:
            if bias.shape != (d_out,):
                raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        else:
            self.bias = None

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> HuffmanLinear:
        return cls(tensors, bias=bias, dtype=dtype)

    last_kernel = "torch-decoded"  # see formats.qlinear.KERNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        bits = effective_bits({k: getattr(self, k) for k in HPTQ_KEYS}, self.weight.numel())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits_per_weight={bits:.4f}"
        )


def build_hptq_module(
    tensors: Mapping[str, torch.Tensor], meta: Mapping, bias: torch.Tensor | None = None
) -> HuffmanLinear:
    """The checkpoint loader's builder for the "hptq" format (errors as ``FormatError``)."""
    try:
        module = HuffmanLinear.from_tensors(tensors, bias=bias)
    except huffman.HuffmanError as exc:
        raise FormatError(f"HPTQ stream or table is corrupt: {exc}") from None
    for key, have in (("in_features", module.in_features), ("out_features", module.out_features)):
        if key in meta and int(meta[key]) != have:
            raise FormatError(f"stored HPTQ tensors give {key}={have}, expected {int(meta[key])}")
    return module
