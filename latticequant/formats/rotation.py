"""Rotated layers on disk and at run time: the transform's tensors and the module that applies it.

A layer quantized in a rotated input basis (:mod:`latticequant.core.rotation`) stores, besides
its method's tensors, the rotation ``R`` that turns its inputs into that basis:

- ``rot_signs``: uint8, the ``n`` signs packed 8 per byte, bit ``i % 8`` of byte ``i // 8`` set
  for ``-1`` (the padding bits of the last byte are zero);
- ``rot_factor``: float64 ``(m, m)``, the small orthogonal factor of the odd part of ``n``;
- ``rot_seed``: int64 ``(1,)``, the seed the transform was drawn from (for the record).

They count in the layer's effective bits like any stored tensor. :class:`RotatedLinear` runs
``x -> x R`` (the fast Walsh-Hadamard transform: torch on the CPU, the Triton kernel on CUDA)
and then the quantized module built from the method's tensors, which hold ``W R``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from latticequant.core.rotation import Rotation, fwht, hadamard_rotation
from latticequant.formats import kernels
from latticequant.formats.dispatch import BACKENDS, use_kernels
from latticequant.formats.gptq import GPTQ_V1, GPTQ_V2
from latticequant.formats.hptq import HPTQ
from latticequant.formats.packing import FormatError
from latticequant.formats.protocol import (
    Format,
    UnsupportedConfigError,
    format_names,
    get_format,
    register_format,
)
from latticequant.formats.ssqr import SSQR

__all__ = [
    "ROTATED_FORMAT",
    "RotatedFormat",
    "rotated",
    "ROTATION_KEYS",
    "ROTATION_KINDS",
    "pack_rotation",
    "unpack_rotation",
    "RotatedLinear",
    "TransformedLinear",
]

ROTATION_KEYS = ("rot_signs", "rot_factor", "rot_seed")
ROTATION_KINDS = ("none", "hadamard")
ORTHOGONAL_TOL = 1e-9


def pack_rotation(rotation: Rotation, seed: int) -> dict[str, torch.Tensor]:
    """The tensors a rotated layer stores for its transform."""
    if rotation.factor_major:
        raise ValueError("rot_signs/rot_factor hold the H_a (x) factor layout, not factor-major")
    n = rotation.n
    negative = (rotation.signs < 0).to(torch.uint8)
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
    padded[:n] = negative
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    packed = (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return {
        "rot_signs": packed,
        "rot_factor": rotation.factor.to(torch.float64).contiguous(),
        "rot_seed": torch.tensor([int(seed)], dtype=torch.int64),
    }


def unpack_rotation(tensors: Mapping[str, torch.Tensor], n: int) -> Rotation:
    """The rotation of a layer with ``n`` inputs from its stored tensors; every inconsistency
    (a missing tensor, a wrong dtype or size, set padding bits, a factor that is not
    orthogonal) is a one-line :class:`FormatError`."""
    missing = [k for k in ROTATION_KEYS if k not in tensors]
    if missing:
        raise FormatError(
            f"the layer is stored rotated but its transform is missing ({', '.join(missing)}); "
            "the checkpoint is incomplete, quantize it again"
        )
    packed, factor = tensors["rot_signs"], tensors["rot_factor"]
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-n // 8):
        raise FormatError(
            f"rot_signs must be {-(-n // 8)} uint8 bytes for {n} inputs, got "
            f"{packed.dtype} {list(packed.shape)}"
        )
    if factor.dtype != torch.float64 or factor.dim() != 2 or factor.shape[0] != factor.shape[1]:
        raise FormatError(
            f"rot_factor must be a square float64 matrix, got {factor.dtype} {list(factor.shape)}"
        )
    m = factor.shape[0]
    a = n // m if m and n % m == 0 else 0
    if a == 0 or a & (a - 1) or m % 2 == 0 and m != 1:
        raise FormatError(f"rot_factor of size {m} does not split {n} inputs as 2^k x odd")
    eye = torch.eye(m, dtype=torch.float64)
    if not torch.isfinite(factor).all() or (factor @ factor.T - eye).abs().max() > ORTHOGONAL_TOL:
        raise FormatError("rot_factor is not orthogonal: the stored transform is corrupt")
    bits = (packed[:, None].to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    bits = bits.reshape(-1)
    if bits[n:].any():
        raise FormatError("rot_signs has padding bits set past the last input: corrupt transform")
    signs = (1 - 2 * bits[:n]).to(torch.float64)
    return Rotation(signs, factor.clone())


class RotatedLinear(nn.Module):
    """``y = inner(x R)``: a quantized layer whose stored weight is ``W R``.

    ``backend``: "auto" (the Triton kernel for CUDA inputs, torch otherwise), "torch" or
    "triton" (on CPU tensors that needs ``TRITON_INTERPRET=1``). The transform runs in float32
    (bfloat16 butterflies would add the rounding of ``log2 n`` sums) and hands ``inner`` the
    input's dtype.
    """

    def __init__(self, rotation: Rotation, inner: nn.Module, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
        self.inner = inner
        self.backend = backend
        self.a, self.m = rotation.a, rotation.m
        self.factor_major = rotation.factor_major
        self.in_features = rotation.n
        self.out_features = getattr(inner, "out_features", None)
        self.register_buffer("signs", rotation.signs.to(torch.float32), persistent=False)
        self.register_buffer("factor", rotation.factor.to(torch.float32), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` in float32 over the last axis."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features, this layer takes {self.in_features}"
            )
        butterfly = kernels.hadamard_transform if use_kernels(self.backend, x) else fwht
        return self._rotation().apply(x.to(torch.float32), butterfly)

    def _rotation(self) -> Rotation:
        """The rotation on the buffers as they are now (``.to()`` replaces them), built once."""
        r = self.__dict__.get("_cached_rotation")
        if r is None or r.signs is not self.signs or r.factor is not self.factor:
            r = Rotation(self.signs, self.factor, self.factor_major)
            self.__dict__["_cached_rotation"] = r
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.rotate(x).to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hadamard={self.a}x{self.m}"


class TransformedLinear(nn.Module):
    """``y = inner(x T)`` with ``T = I_{n / b} (x) B / scale`` (``B^T`` when ``transpose``): a
    ``b x b`` matrix ``B`` read from the checkpoint, applied to each run of ``b`` inputs
    (compressed-tensors' ``random-hadamard`` and ``random-matrix`` transforms, which no reader
    can build; ``scale`` is ``sqrt(b)`` for the Hadamard types, whose stored entries are +-1).

    The product runs in ``B``'s dtype, as compressed-tensors runs it (the input cast to the
    transform's dtype, multiplied, divided by ``scale``, cast back), and hands ``inner`` the
    input's dtype. ``matrix`` may be an ``nn.Parameter`` that several layers share (the file
    stores one per size): it then moves between devices once, as tied weights do.
    """

    def __init__(
        self, matrix: torch.Tensor, inner: nn.Module, scale: float = 1.0, transpose: bool = False
    ) -> None:
        super().__init__()
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a transform block must be square, got {list(matrix.shape)}")
        in_features = getattr(inner, "in_features", None)
        if not isinstance(in_features, int) or in_features % matrix.shape[0]:
            raise ValueError(f"blocks of {matrix.shape[0]} do not split {in_features} inputs")
        self.inner = inner
        if not isinstance(matrix, nn.Parameter):
            matrix = nn.Parameter(matrix, requires_grad=False)
        self.matrix = matrix
        self.scale = float(scale)
        self.transpose = bool(transpose)
        self.block = matrix.shape[0]
        self.in_features = in_features
        self.out_features = getattr(inner, "out_features", None)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x T`` in the matrix's dtype over the last axis."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features, this layer takes {self.in_features}"
            )
        lead = x.shape[:-1]
        y = x.to(self.matrix.dtype).reshape(*lead, self.in_features // self.block, self.block)
        y = (y @ (self.matrix.T if self.transpose else self.matrix)) / self.scale
        return y.reshape(*lead, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.rotate(x).to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, block={self.block}, dtype={self.matrix.dtype}"


ROTATED_FORMAT = "latticequant-hadamard"
"""The file-level ``format`` of a checkpoint with rotated layers: their stored weights are
``W R`` and mean nothing to a reader that does not apply ``R`` first."""


class RotatedFormat(Format):
    """A layer of format ``inner`` quantized in a randomised Hadamard basis of its inputs:
    ``inner``'s tensors hold ``W R``, and the transform's tensors ride beside them."""

    quant_method = "latticequant"

    def __init__(self, inner: Format) -> None:
        self.inner = inner
        self.name = f"{inner.name}+hadamard"
        self.keys = inner.keys + ROTATION_KEYS
        self.optional_keys = inner.optional_keys
        self.key_kinds = {**inner.key_kinds, **dict.fromkeys(ROTATION_KEYS, "rotation")}
        self.kernels = inner.kernels

    def check(self, config, d_out=None, d_in=None) -> None:
        self.inner.check(config, d_out, d_in)

    def min_zero(self, config) -> int:
        return self.inner.min_zero(config)

    def layer_rotation(self, n: int, seed: int) -> tuple[Rotation, dict[str, torch.Tensor]]:
        """The layer's own randomised Hadamard rotation, drawn from ``seed``, and its tensors."""
        rotation = hadamard_rotation(n, seed)
        return rotation, pack_rotation(rotation, seed)

    def unpack(self, tensors, meta):
        """The inner format's parts (of ``W R``)."""
        return self.inner.unpack(tensors, meta)

    def dequantize(self, tensors, meta, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(W R) R^T``: the layer's weight in its own input basis."""
        stored = self.inner.dequantize(tensors, meta, torch.float64)
        rotation = unpack_rotation(tensors, stored.shape[1])
        return rotation.apply_transpose(stored).to(dtype)

    def module(self, tensors, meta, bias=None) -> nn.Module:
        inner = self.inner.module({k: tensors[k] for k in tensors if k not in ROTATION_KEYS},
                                  meta, bias)  # fmt: skip
        return RotatedLinear(unpack_rotation(tensors, inner.in_features), inner)

    def file_config(self, base, meta) -> dict:
        config = self.inner.file_config(base, meta)
        config.update(quant_method=self.quant_method, format=ROTATED_FORMAT)
        return config

    def module_meta(self, entry, file_config, name: str = "") -> dict:
        return self.inner.module_meta(entry, file_config, name)

    def check_file_config(self, name, tensors, meta, file_config) -> None:
        """The file must say it is rotated (no GPTQ reader may take ``W R`` for ``W``), and
        what it says of the inner layer must hold."""
        super().check_file_config(name, tensors, meta, file_config)
        if file_config.get("format") != ROTATED_FORMAT:
            raise FormatError(
                f"it is rotated but the file-level format is {file_config.get('format')!r}, "
                f"not {ROTATED_FORMAT!r}: the checkpoint is inconsistent"
            )
        inner = {k: t for k, t in tensors.items() if k not in ROTATION_KEYS}
        self.inner.check_file_config(name, inner, meta, file_config)


ROTATED = {f.name: register_format(RotatedFormat(f)) for f in (GPTQ_V1, GPTQ_V2, SSQR, HPTQ)}


def rotated(fmt: Format) -> Format:
    """The registered rotated variant of ``fmt`` (``<name>+hadamard``: ours above, or one a
    format module registers itself, as compressed-tensors does); a one-line refusal for a
    format without one."""
    name = f"{fmt.name}+hadamard"
    if name not in format_names():
        raise UnsupportedConfigError(
            f"--rotate hadamard cannot be stored in the {fmt.name} format: {fmt.rotation_hint}"
        )
    return get_format(name)
